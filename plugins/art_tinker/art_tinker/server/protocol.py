"""The Tinker HTTP API as the unmodified ``tinker`` 0.38 SDK speaks it, and what this loopback server answers.

Read from the SDK itself (``tinker/_client.py``, ``resources/*``, ``lib/internal_client_holder.py``,
``lib/api_future_impl.py``, ``lib/public_interfaces/{service,training,sampling,rest}_client.py``,
``proto/{request,response}_conv.py``). Everything below is a fact about that client; "server:" marks what we do.

Transport
---------
* Base URL: ``TINKER_BASE_URL`` (or ``base_url=``), trailing ``/`` dropped; plain ``http://127.0.0.1:PORT`` works.
* Auth: every request carries ``X-API-Key: <key>``; the SDK refuses keys not starting ``tml-`` (or a JWT ``eyJ``).
  Server: constant-time compare; a missing or wrong key is 401 (``AuthenticationError``, never retried).
* JSON bodies are pydantic ``model_dump(exclude_none=True)`` of the SDK's request types, each with a ``type``
  literal. Server: parsed with those same types (strict, extra fields forbidden) so a malformed body is a 400.
* HTTP retries, two layers: the httpx layer retries 408/409/429/5xx up to 10 times (``x-should-retry`` overrides),
  and ``InternalClientHolder.execute_with_retries`` retries 408/409/429/5xx and connection errors for up to 5
  minutes with exponential backoff. 400/401/403/404/422 are raised at once. A 400 with an *empty* body is taken
  for a proxy error and retried as a connection error, so every 4xx here carries a JSON body
  ``{"error": <kind>, "message": <text>}``. Server: user errors are 4xx; 5xx only for our own bugs.
* Telemetry: ``POST /api/v1/telemetry`` (``TelemetrySendRequest``) unless ``TINKER_TELEMETRY=0``;
  answer ``{"status": "accepted"}``.

Client start-up (``InternalClientHolder.__init__``)
--------------------------------------------------
1. ``POST /api/v1/client/config`` ``{sdk_version}`` -> ``ClientConfigResponse`` feature flags. Server:
   ``pjwt_auth_enabled=false`` (plain API keys), ``use_pyqwest_transport=false`` (plain httpx on loopback),
   ``parallel_fwdbwd_chunks=false`` (chunks of one forward_backward are sent one after the other, so requests of a
   model arrive in ``seq_id`` order), ``proto_compress_fwdbwd=false``, ``sample_use_retrieve_futures=false``,
   ``custom_loss_server_side=false`` (``forward_backward_custom`` runs client-side, see below),
   ``sample_join_sampling_session=false``.
2. ``POST /api/v1/client/dynamic_config`` ``{sdk_version}`` -> ``ClientDynamicConfigResponse``
   (``refresh_interval_sec``, ``sample_cancel_enabled=false``); re-fetched in the background.
3. ``POST /api/v1/create_session`` ``{tags, user_metadata, sdk_version, project_id?, display_name?}`` ->
   ``{"type": "create_session", "session_id": ...}``. A REST-only client (``RestClient``) skips this.
4. Every 10 s: ``POST /api/v1/session_heartbeat`` ``{session_id}`` -> ``{"type": "session_heartbeat"}``; a 410
   stops the loop. Server: unknown session 404, finished session 410.
5. ``ServiceClient.close(status)``: ``POST /api/v1/sessions/{id}/finish`` ``{"reason": {"type": status},
   "detail": ...}`` -> null. Server: the session's live models are dropped (saved checkpoints stay on disk).

Futures
-------
Mutating calls answer at once with ``UntypedAPIFuture`` ``{request_id, model_id?, sample_sequence_ids?}``; the SDK
then polls ``POST /api/v1/retrieve_future`` ``{request_id, allow_metadata_only}`` (45 s client timeout, no httpx
retries) with ``Accept: application/x-protobuf`` when it expects a ``ForwardBackwardOutput`` or a
``SampleResponse``. Answers:
* pending: ``{"type": "try_again", "request_id", "queue_state": "active"}`` (or HTTP 408): the SDK polls again
  *at once*, so the server long-polls (holds the request up to ``long_poll_s``) before saying try_again;
* failed: ``{"error": <message>, "category": "user"|"server"|"unknown"}`` -> ``RequestFailedError`` at once;
* done: the result as JSON, except ``ForwardBackwardOutput`` and ``SampleResponse``, which must be protobuf
  (``Content-Type: application/x-protobuf``, ``tinker.proto.tinker_public_pb2``; this SDK rejects JSON for them);
* unknown ``request_id``: 404 (fatal ``ValueError`` in the SDK); 410 would make it resubmit the original request.

Training model
--------------
* ``POST /api/v1/create_model`` ``{session_id, model_seq_id, base_model, user_metadata?, lora_config: {rank, seed?,
  train_mlp, train_attn, train_unembed}, optimizer_config: {"type": "adamw"}}`` -> future of
  ``{"model_id", "type": "create_model"}``. ``model_id = f"{session_id}:train:{model_seq_id}"`` (the SDK derives
  it itself for create-via-load). Then ``POST /api/v1/get_info`` ``{model_id}`` (direct JSON) -> ``GetInfoResponse``
  ``{model_id, model_data: {model_name, tokenizer_id, arch}, is_lora, lora_rank, model_name}``; the SDK's
  ``get_tokenizer()`` loads ``AutoTokenizer`` from ``tokenizer_id`` (split at ``:``), so it is the base model path.
* Ordering: each ``TrainingClient`` numbers its requests ``seq_id = 1, 2, ...`` and sends the next one only when
  the previous HTTP POST has returned (``_take_turn``); the server executes a model's requests in ``seq_id`` order
  (a request waits briefly for a missing lower ``seq_id``, then runs anyway, so a request the server refused at
  submission cannot stall the model). A repeated ``(model_id, seq_id)`` (an HTTP retry) returns the first
  request's id. Custom-loss calls reserve ``2 * chunks`` ids: forward chunks, then backward chunks.
* ``POST /api/v1/forward_backward``: body is protobuf ``ForwardBackwardRequest`` (``model_id, seq_id, data[Datum],
  loss_fn, loss_fn_config, loss_fn_config_v2, forward_only``), ``Content-Type: application/x-protobuf``,
  ``Content-Encoding: zstd`` when ``proto_compress_fwdbwd``. ``Datum.model_input`` chunks hold int32 token bytes;
  ``loss_fn_inputs`` are ``Tensor``s (dense bytes, or CSR ``values/crow_indices/col_indices``, pad 0; float32
  or int64). All per-token tensors align with ``model_input``: position ``i`` predicts ``target_tokens[i]``.
  ``forward`` is the same call with ``forward_only=true``. Result (protobuf ``ForwardBackwardOutput``):
  ``loss_fn_output_type``, one ``ArrayRecord`` whose ``fields["logprobs"]`` is a ``BatchedTensor`` (float32
  bytes of every datum concatenated, ``offsets`` = int64 *byte* offsets, ``num_datums + 1`` of them), and
  ``metrics``. Metric keys must be ``name:reduction`` (``sum|mean|min|max|slack|hash2|unique``): the SDK merges
  chunk results with ``key.split(":")`` and breaks on anything else. Server metric: ``loss:sum``.
* Built-in losses (sum over tokens, no other reduction; inputs per datum):
  ``cross_entropy`` (target_tokens, weights): ``-sum(new * w)``; ``importance_sampling`` (target_tokens,
  logprobs, advantages): ``-sum(exp(new - old) * A)``; ``ppo``: ``-sum(min(r * A, clip(r, lo, hi) * A))``;
  ``cispo``: ``-sum(sg(clip(r, lo, hi)) * new * A)`` with ``loss_fn_config`` ``clip_low_threshold`` /
  ``clip_high_threshold`` (ratios, default 0.8 / 1.2; per-token ``loss_fn_inputs`` of the same names win);
  ``dro``: ``-sum(new * A - beta/2 * (new - old)^2)`` with ``loss_fn_config["beta"]`` (default 0.05).
  Others (``gspo``, ``stable_reinforce``, ``custom``) fail as user errors.
* ``forward_backward_custom`` (client side, ``custom_loss_server_side=false``): a ``forward`` with
  ``cross_entropy`` (weights 0) returns ``logprobs``; the client evaluates the user's loss in torch, then sends a
  ``forward_backward`` with ``cross_entropy`` and ``weights = -dLoss/dlogprobs``; it replaces ``loss:sum`` in the
  result with the custom loss and adds ``surrogate_loss:sum``.
* ``POST /api/v1/optim_step`` ``{adam_params: {learning_rate, beta1, beta2, eps, weight_decay, grad_clip_norm},
  model_id, seq_id}`` -> future of ``OptimStepResponse {metrics}``. Gradients accumulate over forward_backward
  calls until this step; it applies and clears them.
* ``POST /api/v1/save_weights`` ``{model_id, path: name, seq_id, ttl_seconds?, overwrite, user_metadata?}`` ->
  future of ``{"path": "tinker://{model_id}/weights/{name}"}`` (resumable: weights + optimizer).
* ``POST /api/v1/save_weights_for_sampler`` ``{model_id, path?: name, seq_id, sampling_session_seq_id?, kind}``:
  with a name -> ``{"path": "tinker://{model_id}/sampler_weights/{name}"}``; without one (the SDK's
  ``save_weights_and_get_sampling_client``) -> ``{"sampling_session_id": ...}`` over ephemeral weights.
* ``POST /api/v1/load_weights`` ``{path, optimizer}`` plus either ``{model_id, seq_id}`` (load into an existing
  model) or ``{session_id, model_seq_id, base_model?, user_metadata?, optimizer_config?}`` (create the model
  ``{session_id}:train:{model_seq_id}`` from the checkpoint, its LoRA config taken from the checkpoint) ->
  future of ``{"path", "model_id", "type": "load_weights"}``; then ``get_info`` as above.

Sampling
--------
* ``POST /api/v1/create_sampling_session`` ``{session_id, sampling_session_seq_id, base_model?, model_path?}`` ->
  ``{"sampling_session_id"}`` (direct JSON). ``model_path`` is ``tinker://{run}/sampler_weights/{name}`` (or
  ``/weights/{name}``). ``GET /api/v1/samplers/{id}`` -> ``{sampler_id, base_model, model_path}``.
* ``POST /api/v1/asample`` ``SampleRequest`` ``{sampling_session_id, seq_id, num_samples, prompt: {chunks:
  [{"type": "encoded_text", "tokens"}]}, sampling_params: {max_tokens, seed, stop, temperature, top_k, top_p},
  prompt_logprobs, topk_*, ...}`` -> future with ``sample_sequence_ids`` (one per sample; the SDK asserts it).
  Result: protobuf ``SampleResponse`` (``sequences[{stop_reason, tokens: int32 bytes, logprobs: float32
  bytes}]``, ``prompt_logprobs`` float32 bytes with NaN at position 0 when asked). ``stop``: None = EOS,
  ``[]`` = none, else strings or token ids. A 429 makes the SDK back off and resubmit.

Checkpoints (REST, no futures)
------------------------------
* ``GET /api/v1/training_runs/{model_id}/checkpoints`` -> ``{checkpoints: [{checkpoint_id: "weights/{name}" |
  "sampler_weights/{name}", checkpoint_type: "training" | "sampler", time, tinker_path, size_bytes, public,
  user_metadata, expires_at}], cursor: null}``.
* ``DELETE /api/v1/training_runs/{model_id}/checkpoints/{checkpoint_id}`` (the id contains a ``/``) -> null.
"""

from __future__ import annotations

PROTOBUF = "application/x-protobuf"
API_PREFIX = "/api/v1"

# The 19 routes the SDK needs for LoRA training, saving, resuming and sampling (docs/protocols.md §2).
ROUTES: tuple[tuple[str, str], ...] = (
    ("POST", "/client/config"),
    ("POST", "/client/dynamic_config"),
    ("POST", "/create_session"),
    ("POST", "/session_heartbeat"),
    ("POST", "/sessions/{session_id}/finish"),
    ("POST", "/telemetry"),
    ("POST", "/create_model"),
    ("POST", "/get_info"),
    ("POST", "/forward_backward"),
    ("POST", "/optim_step"),
    ("POST", "/save_weights"),
    ("POST", "/save_weights_for_sampler"),
    ("POST", "/load_weights"),
    ("POST", "/create_sampling_session"),
    ("GET", "/samplers/{sampler_id}"),
    ("POST", "/asample"),
    ("POST", "/retrieve_future"),
    ("GET", "/training_runs/{model_id}/checkpoints"),
    ("DELETE", "/training_runs/{model_id}/checkpoints/{checkpoint_id:path}"),
)

# Feature flags for POST /client/config (see the module docstring for why each is set).
CLIENT_CONFIG: dict[str, object] = {
    "pjwt_auth_enabled": False,
    "credential_default_source": "api_key",
    "use_pyqwest_transport": False,
    "parallel_fwdbwd_chunks": False,
    "proto_compress_fwdbwd": False,
    "sample_use_retrieve_futures": False,
    "custom_loss_server_side": False,
    "sample_join_sampling_session": False,
    "sample_no_retries": False,
}

DYNAMIC_CONFIG: dict[str, object] = {
    "refresh_interval_sec": 300,
    "sample_cancel_enabled": False,
    "sample_cancel_max_batch_size": 64,
}
