"""The Prometheus metrics, one registry per app, recorded where each event happens."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# From GPU milliseconds to CPU minutes.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0, 300.0, 600.0, 1800.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)


class Metrics:
    """Every metric of ddim-serve, registered in its own CollectorRegistry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.request_duration = Histogram("ddim_request_duration_seconds", "Request duration",
                                          ["endpoint", "model", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("ddim_queue_wait_seconds", "From submission to the sample's first step",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("ddim_queue_depth", "Samples waiting for a batch slot", ["model"], registry=r)
        self.active_samples = Gauge("ddim_active_samples", "Samples in the running batch", ["model"], registry=r)
        self.batch_size = Histogram("ddim_batch_size", "Rows per network forward (a guided sample counts two)",
                                    ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.forward_seconds = Histogram("ddim_model_forward_seconds", "Time of one eps-network forward",
                                         ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_cache = Counter("ddim_prompt_cache", "Prompt encodings looked up in the model's cache "
                                    "(result: hit, or miss: encoded)", ["model", "result"], registry=r)
        self.encode_seconds = Histogram("ddim_text_encode_seconds", "Time of one text-encoder call (the prompts "
                                        "of the requests admitted together that the cache lacks)", ["model"],
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.decode_seconds = Histogram("ddim_vae_decode_seconds", "Time of one VAE decode (the jobs of one shape "
                                        "finishing on the same step)", ["model"], buckets=LATENCY_BUCKETS,
                                        registry=r)
        self.sample_steps = Counter("ddim_sample_steps", "Sample-steps computed", ["model"], registry=r)
        self.images = Counter("ddim_images", "Images returned (generate, interpolation frames) or latents (invert)",
                              ["model", "endpoint"], registry=r)
        self.rejected = Counter("ddim_requests_rejected",
                                "Requests to /generate, /invert, /interpolate refused, by reason", ["reason"],
                                registry=r)
        self.model_info = Gauge("ddim_model_info", "Loaded models (value 1), with how they are loaded",
                                ["model", "device", "dtype", "num_train_timesteps", "image_size", "channels"],
                                registry=r)
        self.ready = Gauge("ddim_ready", "1 once every model that can load is loaded and warmed up", registry=r)
        self.model_load_failed = Gauge("ddim_model_load_failed", "1 for a model of the store that failed to load "
                                       "(/models has its error)", ["model"], registry=r)
        self.startup_seconds = Gauge("ddim_startup_seconds", "Time from start to ready", registry=r)
        self.failures = Counter("ddim_failures", "Requests failed by a fault of the model or the worker (cause: "
                                "forward_error, non_finite, worker_restart), and forwards retried in halves "
                                "(out_of_memory_retry)", ["model", "cause"], registry=r)
        self.jobs = Gauge("ddim_jobs", "Jobs held in the job store, by status", ["status"], registry=r)
        self.job_result_bytes = Gauge("ddim_job_result_bytes", "Memory held by retained job results", registry=r)
        self.cancelled = Counter("ddim_requests_cancelled", "Requests and jobs cancelled before they finished "
                                 "(DELETE /jobs/{id}, or the client went away)", ["model"], registry=r)
        self.deadline_expired = Counter("ddim_deadline_expired", "Requests and jobs that passed their deadline",
                                        ["model"], registry=r)
        self.first_progress = Histogram("ddim_time_to_first_progress_seconds", "From submission to the first "
                                        "progress event (the first finished step)", ["model"],
                                        buckets=LATENCY_BUCKETS, registry=r)
