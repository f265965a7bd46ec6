"""pupyl-queue: reverse image search as an asynchronous task-queue system."""

from pupyl_queue.characteristics import Characteristic
from pupyl_queue.client import Job, JobFailed, PupylQueue, TaskFailed
from pupyl_queue.settings import Settings

__all__ = ["Characteristic", "Job", "JobFailed", "PupylQueue", "Settings", "TaskFailed"]
__version__ = "0.1.0"
