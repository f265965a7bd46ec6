"""The aiohttp service (issue: the service face). Not built yet."""
