"""Nodes and notebooks, never DP or bias: a profile's stage graph (`graph`), one node's execution
with papermill (`node`), the whole graph on this machine or on Slurm (`run`, `slurm`), what a
notebook knows about its node (`context`) and which code computed it (`provenance`).

Nothing here imports the science (training, bias, data, results): `run.run` takes the two calls
into it as hooks, which `dpbias_utils.cli` supplies.
"""
