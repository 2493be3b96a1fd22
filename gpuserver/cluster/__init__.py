"""Many GPUs behind one address: the gpuserver app on Ray Serve, one replica per GPU.

- `runner`: the `gpuserver cluster` command (deploy, wait, tear down);
- `local`: a throwaway Ray cluster of nodes with pretend GPUs on 127.0.0.1;
- `replica`: the Serve deployment around `create_app` (placement, drain);
- `router`: where a connection goes (its own replica, else the least loaded);
- `api`: `/api/cluster`; `serve_state`: what Serve's controller says about the replicas.

Needs the `ray` extra (`pip install -e ".[ray]"`).
"""
