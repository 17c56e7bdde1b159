"""portq's work and its job contract. Imports neither Celery nor Typer; torch only inside the steps."""
