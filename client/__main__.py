"""`python -m portq.client` is the `portq` command."""

from portq.client.cli import main

main()
