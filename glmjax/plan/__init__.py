"""Plan before you pay: the real training step or generation programs compiled ahead of time for
hardware that is not attached (targets.py), their memory per device, FLOPs, collectives and the
time a roofline allows (roofline.py, hlo.py, programs.py)."""
