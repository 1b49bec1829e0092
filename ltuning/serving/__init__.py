"""Batch classification and serving: the engine (:mod:`.engine`), streamed files (:mod:`.stream`), CPU dtype
choice and int8 (:mod:`.cpu`), the HTTP server (:mod:`.server`)."""
