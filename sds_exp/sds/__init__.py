"""The SDS method: sequential block walking, Gram-form layer reconstruction, and the pipeline."""
