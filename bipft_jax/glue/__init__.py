"""GLUE finetuning and evaluation: tasks and readers, metrics, the finetuning loop, reports."""
