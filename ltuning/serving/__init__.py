"""Batch classification and serving: the engine (:mod:`.engine`), streamed files (:mod:`.stream`), dynamic
micro-batching (:mod:`.batcher`), CPU dtype choice and int8 (:mod:`.cpu`), the HTTP server (:mod:`.server`), and
the ``ltuning classify`` / ``ltuning serve`` commands (:mod:`.commands`: their flags and what they run)."""
