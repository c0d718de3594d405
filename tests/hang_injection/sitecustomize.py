"""Test-only fault injection for tests/test_faults.py: with this directory on ``PYTHONPATH`` and
``MINILLM_TEST_HANG_GENERATE_S`` set, every process (Ray actors inherit both from the run that
starts Ray) patches ``RolloutWorker.generate`` to sleep that long first: a stuck rollout worker
without a hook in the production code. ``MINILLM_TEST_SLOW_START_S`` likewise delays the worker's
constructor (a teacher that is slow to load). Python imports ``sitecustomize`` at start-up; the patch is
applied when ``minillm_rl.runtime.rollout.worker`` is first imported."""

import importlib.abc
import importlib.util
import os
import sys
import time

_MODULE = "minillm_rl.runtime.rollout.worker"
_DELAY = os.environ.get("MINILLM_TEST_HANG_GENERATE_S")
_START_DELAY = os.environ.get("MINILLM_TEST_SLOW_START_S")


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            generate = module.RolloutWorker.generate

            def sleeping_generate(self, *args, **kwargs):
                time.sleep(float(_DELAY))
                return generate(self, *args, **kwargs)

            module.RolloutWorker.generate = sleeping_generate
            init = module.RolloutWorker.__init__

            def slow_init(self, *args, **kwargs):
                time.sleep(float(_START_DELAY or 0))
                init(self, *args, **kwargs)

            module.RolloutWorker.__init__ = slow_init

        spec.loader.exec_module = exec_module
        return spec


if _DELAY:
    sys.meta_path.insert(0, _PatchOnImport())
