"""The layout planner: which parallel layouts fit a cluster, and how fast each would train.

`cli` (`python -m trainer.plan`), `layouts` (enumerate and rank), `memory` (bytes per rank),
`timing` (step time from FLOPs, bytes and the schedule simulator), `hardware` (GPU table),
`flops` (parameter and FLOP counts, also used for the run's MFU).
"""
