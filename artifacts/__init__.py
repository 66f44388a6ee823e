"""Arrow column types for tensors and the content-addressed Parquet store."""
