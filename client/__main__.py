"""`python -m portq.client` is the `portq` command."""

from portq.client.early import main

main()
