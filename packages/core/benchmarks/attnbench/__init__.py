"""The pieces of `bench.py`: what to measure (cases), how much work it is (flops), who computes it
(providers), how it is timed (timing, runner), what the card can do at best (machine), and how the
results are shown (report). Only `providers`, `timing`, `runner` and `machine` need torch; `report`
works from the saved JSON alone.
"""
