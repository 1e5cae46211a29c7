"""The loss machinery behind :mod:`softxent.functional`, in layers that depend one way:

* :mod:`.spec`: what each loss computes (specs, target preparation, statistics, reductions);
* :mod:`.policy`: how work is cut on each device and backend (blocks, chunks, slices, launch shapes);
* :mod:`.torch_blocks` and :mod:`.triton`: the backends, one block of work each, with one contract;
  :mod:`.backends` selects one for an ``impl`` argument and a device;
* :mod:`.rows`, :mod:`.chunks`, :mod:`.slices`: the drivers (losses on given logits; the speed-mode linear
  heads in chunks of rows; the lean heads in vocabulary slices), which take a backend and its policy;
* :mod:`.autograd`: the autograd Functions that drive them.
"""
