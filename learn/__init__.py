"""The learner: training recipes, EM/F1 evaluation, the gate, the adapter registry, the cycle and its schedule.

    tunewheel learn run | learn schedule | eval | adapters ... | restyle ...     (learn/cli*.py)

Data flow, one module each: curated snapshot (feedback/) -> train.py (the recipe; train_config.py
is the [learn.train] section, train_data.py its data path) -> evaluate.py + metrics.py (EM/F1) ->
gate.py -> registry.py; cycle.py runs them in order under lock.py, scheduler.py decides when.
restyle.py and restyle_train.py do the same for the restyler. Imports nothing from serve/.
"""
