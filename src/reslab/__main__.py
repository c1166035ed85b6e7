from reslab.cli import entry

entry()
