"""The data pipeline: sources -> formats -> templates -> encode (labels) -> batching; demo data; report and check."""
