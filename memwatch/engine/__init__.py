"""The extraction engine (torch): batched greedy extraction, the teacher-forced pass and its fp32 statistics, decoding and cache handling, model introspection, the result."""
