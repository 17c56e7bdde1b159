"""portq's command line (Typer). Talks to the queue through the job contract, never the worker's code."""
