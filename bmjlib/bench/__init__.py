"""`bmj bench`: how fast each step runs, how its cost grows, how close it gets to the machine.

core   the row type, timing and memory helpers, the report
steps  the CPU rows, one function per row group
gpu    the paper-scale model on a GPU
"""
