"""finetune-mcp: a Model Context Protocol server that lets an LLM client drive FinetuneJobs.

The seed's four tools (prepare_dataset, finetune_unsloth, export_gguf, run_eval) plus get_status,
list_jobs, get_artifacts, adjust_and_rerun and wait, over stdio or streamable HTTP. It acts with the
caller's kubeconfig (or its own ServiceAccount in a cluster), never the operator's; it creates and
patches FinetuneJobs and the operator does the rest.

    fields.py    tool parameters taken from the FinetuneJob API models (one source for bounds and help)
    jobs.py      pure: tool arguments -> FinetuneJob manifests and spec patches, field-named errors
    views.py     pure: FinetuneJob objects -> what the tools return; progress for notifications
    cluster.py   the Kubernetes calls, with the caller's identity; apiserver errors made readable
    datasets.py  prepare_dataset: validate and preview a dataset in process
    server.py    the MCP server and its tools
    http_transport.py  streamable HTTP behind a bearer token
    cli.py       the `finetune-mcp` command
"""
