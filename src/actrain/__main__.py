from actrain.cli import entry

entry()
