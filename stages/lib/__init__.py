"""The libraries of the domain: what every stage, backend, command and `train/` share.

Stage modules (`stages/<stage>.py`), backends, source adapters, commands and `train/` import these;
these import only each other and `pipeline`. A fact about records (schema, geometry, the evidence
grammar, the answer scorer, the ground truth, what the model sees, how frames are decoded) lives in
exactly one module here.
"""
