"""Ways to start the training recipe: torchrun on one machine, Slurm jobs, sweeps over a grid.

Above the recipe: these modules import it, never the reverse.
"""
