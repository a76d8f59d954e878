"""ddim-serve on Ray Serve: the same FastAPI app in every replica of one ingress deployment (docs/ray.md).

Each replica runs create_app's app with its own Engine (step-level batching inside); Serve's proxy balances requests
across replicas. Jobs stay on the replica that runs them; a named Ray actor (the job directory) maps each job to its
owner, and a replica forwards reads and cancels of another's job to the owner's internal HTTP port.

Ray is an optional extra (`pip install -e '.[ray]'`): nothing outside this package imports it, and importing this
package does not import Ray either (deployment.py and cli.py do).
"""
