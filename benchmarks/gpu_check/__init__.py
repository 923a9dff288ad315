"""``make gpu-check``: the GPU path of ``seg_core``, proven on one device, with no Ray and no network.

The Ray layer's GPU work all runs through ``seg_core``: the Ray Train workers call
``seg_core.engine.train_step``, the predict actors and the Serve replicas call
``seg_core.inference.Segmenter``.  This check runs exactly that code with nothing but torch and
the project's pure dependencies, so it runs on a lent GPU machine that has no Ray.  Four parts:

1. **Training throughput and MFU** (:mod:`.throughput`).  ``train_step`` at 512x512, bf16
   autocast, channels_last, for base widths 32 and 64 at the largest batch a memory probe finds
   under 60% of the device.  Images/s, achieved TFLOP/s (forward + backward FLOPs from
   ``torch.utils.flop_counter``), and MFU against two ceilings: the dense bf16 peak of the
   device's datasheet, and a bf16 GEMM ceiling measured on the device at start.  Fused AdamW
   and then ``torch.compile`` are tried and kept only where faster.
2. **ISBI 2012 at full 512x512** (:mod:`.isbi`).  A base-32 U-Net trained from scratch on the
   24 train slices for a fixed wall budget (240 s), with the U-Net paper's augmentation on the
   GPU (the 8 symmetries of the square and ``seg_core.transforms.elastic_deform``: 3x3 grid,
   10 px), then the 6 val slices scored with the real ``Segmenter`` in fp32 and bf16.
3. **Inference** (:mod:`.inference`).  ``Segmenter.predict_batch`` images/s at 512x512 and on
   2048x2048 mosaics (tiled), bf16, against a plain loop over the same folded network and
   autocast on the same uint8 arrays, in alternation.  Both sides pay the host-to-device copy
   and bring their masks back to the host.
4. **Correctness on the device** (:mod:`.correctness`).  bf16 against fp32 masks; a checkpoint
   and an artifact saved on the device and restored on the CPU (and back) give identical fp32
   logits; the CUDA (and CPU) generator states survive ``torch.save`` /
   ``torch.load(weights_only=True)``.

``GPU_CHECK_CPU=1`` (or ``--cpu``) runs the same script on the CPU with tiny sizes and generated
membrane images, in well under 2 minutes: ``make test`` does that so the script never rots.
Results go to ``$OUT`` (else ``rayseg_work/gpu_check/``): ``gpu_check.json`` and a Markdown table
``gpu_check.md``; one JSON line and the table are printed as well.  The ISBI slices are read from
``--data``, ``$GPU_CHECK_DATA``, ``.gpu_check_data/isbi2012_em_membrane`` (``make gpu-check-data``
copies them there, an ignored folder that can travel to a device machine) or
``../shared/data/isbi2012_em_membrane``.  Exit status 1 when any correctness goal fails (bf16
agreement, or a round trip that is not identical).
"""
