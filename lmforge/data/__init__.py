"""The corpus as lmforge reads it: formats and documents, the builtin corpora, conversations, the
data engines (local processes or Ray) that measure and encode it, the token shards, contamination."""
