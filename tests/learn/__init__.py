"""Tests of learn/: config, recipe, evaluation, gate, registry, cycle, scheduler, restyler."""
