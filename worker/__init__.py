"""portq's Celery side: the app, its task and the worker entry point. Imports torch nowhere."""
