"""What is not the method: processes and collectives, run directories and checkpoints, metrics and charts, the
command line's error path, and the token file SFT reads. Plain functions; skip this folder on a first read."""
