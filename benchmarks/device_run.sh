#!/usr/bin/env bash
# On a GPU machine that has torch and triton but no network: install what was carried (.whl/
# wheels, .carry/lib/libopus), run the GPU tests (TESTS=...), `make bench`, with FP8=1 the FP8
# fidelity and bench, with LOAD=1 a load-test sweep of ppx-serve on random 7B weights
# (SERVE_ARGS="--quantize fp8 --kv-cache-dtype fp8" for FP8; SWEEP=32,64 session counts;
# ENDPOINTS=chat,realtime the endpoints, each swept in turn; LOAD_SPREAD=S random session starts;
# CLIENTS=4 load-client processes), with PROFILE=1,32 the per-stage profile at those batch
# sizes (PROFILE_FP8=1: also in FP8), with CHAIN=1 the products chained as a tick chains them.
# Each part is bounded in time; logs and results go to $OUT. The reference's recordings are
# carried in .carry/assets (not committed). The machine's image lacks these, carried as cp312
# manylinux wheels in .whl/: moshi==0.2.13 (the reference), sphn, opuslib (built here with
# `pip wheel`), websockets, soundfile, cffi, pycparser, soxr, pyloudnorm; and
# .carry/lib/libopus.so.0 from a host with libopus0.
set -uo pipefail
OUT=${OUT:-artifacts}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
if [ -f .carry/lib/libopus.so.0 ] && ! ldconfig -p | grep -q libopus.so.0; then
  cp .carry/lib/libopus.so.0 /usr/lib/x86_64-linux-gnu/ && ldconfig
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
if [ "${TESTS:-}" != "" ]; then
  # TESTS is pytest's arguments as one would type them: TESTS="tests -m gpu -k 'golden or 7b'"
  # (-v: each test is named as it ends, so a run stopped by the timeout shows where it was;
  # a test still running after FAULT_AFTER seconds prints every thread's stack)
  eval "timeout \"\${TEST_TIMEOUT:-420}\" python3 -m pytest -v -x --durations=10 \
      -o faulthandler_timeout=\${FAULT_AFTER:-150} $TESTS" 2>&1 | tee "$OUT/gpu_tests.log"
fi
# PROFILE=1,32 profiles those batch sizes; PROFILE_FP8=1 profiles them with FP8 weights and KV
# too; STAGE_TOP=N lists each stage's N largest kernels
for b in $(echo "${PROFILE:-}" | tr , ' '); do
  for v in bf16 $([ "${PROFILE_FP8:-0}" = 1 ] && echo fp8); do
    args=$([ "$v" = fp8 ] && echo "--quantize fp8 --kv-cache-dtype fp8")
    timeout 150 python3 -m benchmarks.profile_tick --batch "$b" --stages --stage-top "${STAGE_TOP:-0}" $args \
        > "$OUT/profile-b$b-$v.txt" 2>&1
    grep -E "^batch|^stage|^graph replay" "$OUT/profile-b$b-$v.txt"
  done
done
if [ "${CHAIN:-0}" = 1 ]; then
  timeout 300 python3 -m benchmarks.gemv_chain 2>&1 | grep -v Warning | tee "$OUT/gemv-chain.txt"
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout "${BENCH_TIMEOUT:-420}" make bench BENCH_ARGS="--out $OUT ${BENCH_ARGS:-}" 2>&1 | tee "$OUT/bench.log"
fi
if [ "${FP8:-0}" = 1 ]; then
  timeout "${FP8_TIMEOUT:-300}" python3 -m benchmarks.fidelity --frames 200 --json "$OUT/fidelity.json" 2>&1 | tee "$OUT/fidelity.log"
  timeout "${BENCH_TIMEOUT:-420}" make bench BENCH_ARGS="--out $OUT --quantize fp8 --kv-cache-dtype fp8 --batches 1,64 --long-session 0 --no-reference" 2>&1 | tee "$OUT/bench-fp8.log"
fi
if [ "${LOAD:-0}" = 1 ]; then
  vdir=$(mktemp -d)
  python3 -m frontends.serve --host 127.0.0.1 --port 8998 --device cuda --random-weights \
      --tokenizer tests/data/golden/tiny-1234/tokenizer.model --voice-prompt-dir "$vdir" \
      ${SERVE_ARGS:-} > "$OUT/serve.out" 2> "$OUT/serve.log" &
  spid=$!
  # (FP8 start-up, its products timed and its graphs captured for every batch bucket, takes minutes)
  for _ in $(seq "${READY_TIMEOUT:-420}"); do grep -q PPX_READY "$OUT/serve.out" 2>/dev/null && break; sleep 1; done
  grep -q PPX_READY "$OUT/serve.out" || echo "the server was not ready after ${READY_TIMEOUT:-420} s" | tee -a "$OUT/load.log"
  # CLIENTS load-client processes share each round's sessions (one Python process cannot
  # pace many dozens of Opus streams by itself)
  clients=${CLIENTS:-1}
  for ep in $(echo "${ENDPOINTS:-chat}" | tr , ' '); do
  for n in $(echo "${SWEEP:-4,16,32}" | tr , ' '); do
    pids=()
    for i in $(seq "$clients"); do
      k=$(( n / clients + (i <= n % clients ? 1 : 0) ))
      [ "$k" -gt 0 ] || continue
      timeout "${LOAD_TIMEOUT:-240}" python3 -m benchmarks.load_client --url ws://127.0.0.1:8998 \
          --endpoint "$ep" --sessions "$k" --duration "${LOAD_SECONDS:-15}" --ramp 2 --seed $((100 * i)) \
          --spread "${LOAD_SPREAD:-0}" \
          --wav .carry/assets/input_assistant.wav --wav .carry/assets/input_service.wav \
          --json "$OUT/load-$ep-$n-$i.json" > "$OUT/load-$ep-$n-$i.log" 2>&1 &
      pids+=($!)
    done
    wait "${pids[@]}"
    echo "== $ep: $n sessions ($clients client process(es))" | tee -a "$OUT/load.log"
    # (each client's "clients:" line has the server's CPU per session-frame over its round)
    grep -h "^all:\|^clients:" "$OUT"/load-"$ep"-"$n"-*.log | tee -a "$OUT/load.log"
    # the server's own view of the round's last seconds: tick time, and where a frame waits
    curl -s 127.0.0.1:8998/metrics > "$OUT/metrics-$ep-$n.txt" || true
    grep -E '^ppx_(tick_seconds|frame_wait_seconds|answer_seconds)\{|^ppx_late_frames_total' "$OUT/metrics-$ep-$n.txt" \
        | tee -a "$OUT/load.log"
    sleep 1
  done
  done
  kill -TERM $spid; wait $spid
  # one archive instead of a dozen files per round (a device run returns only so many files)
  (cd "$OUT" && tar -czf load.tgz load-*.json load-*.log metrics-*.txt serve.out serve.log && \
      rm -f load-*.json load-*.log metrics-*.txt serve.out serve.log)
fi
