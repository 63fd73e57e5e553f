"""The sister inference worker pool: replicas with a block KV cache behind one HTTP server."""
