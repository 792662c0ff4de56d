"""Training glue shared by the tasks: the LightningCLI and callbacks."""
