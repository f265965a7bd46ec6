"""The aiohttp service: ``python -m api`` or ``pupyl-queue api``."""
