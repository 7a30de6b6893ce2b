# shellcheck shell=bash
# moepipe's Slurm launch logic, sourced by slurm/train.sbatch and slurm/sweep.sbatch.
#
# One torchrun per node (srun --ntasks-per-node=1), c10d rendezvous at the job's first node,
# the trainer as `torchrun -m trainer.train CONFIG --set ...`. Preemption: Slurm sends USR1 to
# this batch shell before the time limit (`#SBATCH --signal=B:USR1@SECS`) or TERM on scancel;
# we forward USR1 to every torchrun (srun relays signals to its tasks; `--signals-to-handle` makes
# torchrun pass USR1 to its workers and wait up to --shutdown-timeout for them to save). The trainer finishes its step, checkpoints and exits 75
# (EX_TEMPFAIL); then this shell runs `scontrol requeue` and the requeued job resumes from the
# checkpoint. A failed rank ends its torchrun, and `srun --kill-on-bad-exit` ends the others,
# so a crash is one clear message, not a hang in a collective. A hang is ended by the trainer's
# watchdog (fault.hang_seconds: stacks and the stuck rank's name in train.output_dir/hang/, exit 75).
# A crash (any failure but the trainer's exit 2 for bad input) is requeued too, from the last
# checkpoint, until MOEPIPE_MAX_STALLED_REQUEUES crash-requeues in a row reach no step beyond the
# best one so far (the trainer writes the highest step it reached to MOEPIPE_PROGRESS_FILE).
#
# Environment knobs (all optional):
#   MOEPIPE_ROOT              repository to run in (default: the directory sbatch was called from)
#   MOEPIPE_NPROC_PER_NODE    processes per node (default: GPUs on the node, else 1)
#   MOEPIPE_RDZV_PORT         rendezvous port (default: 20000 + job id mod 20000)
#   MOEPIPE_SHUTDOWN_TIMEOUT  seconds torchrun waits for workers to checkpoint after a signal (600)
#   MOEPIPE_JOIN_TIMEOUT      seconds a node waits for the others at rendezvous (300)
#   MOEPIPE_ENTRY             Python module torchrun runs (default trainer.train)
#   MOEPIPE_PYTHON            interpreter whose torchrun to use (default: python3 on PATH)
#   MOEPIPE_MAX_STALLED_REQUEUES  crash-requeues in a row without progress before giving up (2)
#   MOEPIPE_PROGRESS_FILE     where the trainer records its highest step (default: .moepipe-<job>.progress
#                             in the submit directory; <file>.user_error marks a rejected input)

EXIT_PREEMPTED=75

# First host of a Slurm hostlist without scontrol: "n[003-005,9],gpu1" -> n003, "a-[1-2]-ib" -> a-1-ib.
moepipe_first_host_of() {
    local list=$1 item prefix inside rest first
    item=${list%%,*}
    if [[ $item != *"["* ]]; then
        printf '%s\n' "$item"
        return
    fi
    prefix=${list%%\[*}
    inside=${list#*\[}
    rest=${inside#*\]}
    inside=${inside%%\]*}
    first=${inside%%,*}
    first=${first%%-*}
    printf '%s%s%s\n' "$prefix" "$first" "${rest%%,*}"
}

# The job's head node: scontrol's expansion when available, else our own parse.
moepipe_head_node() {
    local list=${1:?nodelist}
    if command -v scontrol >/dev/null 2>&1; then
        scontrol show hostnames "$list" | head -n 1
    else
        moepipe_first_host_of "$list"
    fi
}

moepipe_log() {
    printf 'moepipe[%s]: %s\n' "$(date +%H:%M:%S)" "$*"
}

# Called by the USR1/TERM trap: forward USR1 to the training step once.
moepipe_forward_signal() {
    local sig=$1
    if [[ -n ${MOEPIPE_PREEMPTED:-} ]]; then
        return
    fi
    MOEPIPE_PREEMPTED=$sig
    moepipe_log "received SIG$sig: asking the trainer to checkpoint and stop"
    if [[ -n ${MOEPIPE_SRUN_PID:-} ]]; then
        kill -USR1 "$MOEPIPE_SRUN_PID" 2>/dev/null || true
    fi
}

# moepipe_launch CONFIG [--set k=v ...]: run one training (one torchrun per node); exit code is
# the job's: 0 done, 75 preempted and requeued, anything else a failure.
moepipe_launch() {
    local root=${MOEPIPE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
    cd "$root" || { moepipe_log "cannot cd to MOEPIPE_ROOT=$root"; return 2; }
    local nodes=${SLURM_JOB_NUM_NODES:-1} job=${SLURM_JOB_ID:?not inside a Slurm job}
    local nproc=${MOEPIPE_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
    local head port py=${MOEPIPE_PYTHON:-python3}
    head=$(moepipe_head_node "${SLURM_JOB_NODELIST:?}")
    port=${MOEPIPE_RDZV_PORT:-$((20000 + job % 20000))}
    moepipe_log "job $job (restart ${SLURM_RESTART_COUNT:-0}) in $root: $nodes node(s) x $nproc process(es)," \
        "rendezvous $head:$port; ${MOEPIPE_ENTRY:-trainer.train} $*"
    export MOEPIPE_HEAD=$head MOEPIPE_PORT=$port MOEPIPE_NNODES=$nodes MOEPIPE_NPROC=$nproc MOEPIPE_PY=$py
    export MOEPIPE_PROGRESS_FILE=${MOEPIPE_PROGRESS_FILE:-${SLURM_SUBMIT_DIR:-$root}/.moepipe-$job.progress}
    rm -f "$MOEPIPE_PROGRESS_FILE.user_error"
    MOEPIPE_PREEMPTED=
    trap 'moepipe_forward_signal USR1' USR1
    trap 'moepipe_forward_signal TERM' TERM
    # shellcheck disable=SC2016  # expanded per node by the inner bash
    srun --kill-on-bad-exit=1 --nodes="$nodes" --ntasks-per-node=1 --label bash -c '
        is_host=0; [[ $SLURM_NODEID == 0 ]] && is_host=1
        exec "$MOEPIPE_PY" -m torch.distributed.run --nnodes="$MOEPIPE_NNODES" --nproc-per-node="$MOEPIPE_NPROC" \
            --rdzv-backend=c10d --rdzv-endpoint="$MOEPIPE_HEAD:$MOEPIPE_PORT" --rdzv-id="$SLURM_JOB_ID" \
            --rdzv-conf="is_host=$is_host,join_timeout=${MOEPIPE_JOIN_TIMEOUT:-300}" --max-restarts=0 \
            --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
            --shutdown-timeout="${MOEPIPE_SHUTDOWN_TIMEOUT:-600}" -m "${MOEPIPE_ENTRY:-trainer.train}" "$@"
    ' moepipe "$@" &
    MOEPIPE_SRUN_PID=$!
    local rc
    while true; do  # `wait` returns early (>128) when a trapped signal arrives; wait again
        wait "$MOEPIPE_SRUN_PID"
        rc=$?
        kill -0 "$MOEPIPE_SRUN_PID" 2>/dev/null || break
    done
    moepipe_finish "$rc"
}

# Decide the job's fate from srun's exit code.
moepipe_finish() {
    local rc=$1
    if [[ $rc == 0 ]]; then
        moepipe_log "training finished"
        return 0
    fi
    # After a forwarded signal torchrun reports the signal, not the workers' 75: trust the signal.
    if [[ $rc == "$EXIT_PREEMPTED" || -n $MOEPIPE_PREEMPTED ]]; then
        moepipe_log "preempted (exit $rc): checkpoint written; requeueing job $SLURM_JOB_ID"
        if scontrol requeue "$SLURM_JOB_ID"; then
            return "$EXIT_PREEMPTED"
        fi
        moepipe_log "scontrol requeue failed; resubmit the same command to resume from the checkpoint"
        return "$EXIT_PREEMPTED"
    fi
    if [[ $rc == 2 || -e ${MOEPIPE_PROGRESS_FILE:-/nonexistent}.user_error ]]; then
        moepipe_log "FAILED: the trainer rejected its input (exit $rc); the error line is above"
        return "$rc"
    fi
    moepipe_crash_requeue "$rc"
}

# A crash: requeue from the last checkpoint unless MOEPIPE_MAX_STALLED_REQUEUES crash-requeues in a
# row have not moved the highest step reached (a crash that repeats at the same place).
moepipe_crash_requeue() {
    local rc=$1 progress best=-1 stalled=0 limit=${MOEPIPE_MAX_STALLED_REQUEUES:-2}
    local file=${MOEPIPE_PROGRESS_FILE:-${SLURM_SUBMIT_DIR:-.}/.moepipe-$SLURM_JOB_ID.progress}
    read -r progress < "$file" 2>/dev/null || progress=0  # builtins only: no PATH needed
    [[ $progress =~ ^[0-9]+$ ]] || progress=0
    if [[ -r $file.requeues ]]; then read -r best stalled < "$file.requeues"; fi
    if (( progress > best )); then stalled=0; else stalled=$((stalled + 1)); fi
    echo "$(( progress > best ? progress : best )) $stalled" > "$file.requeues"
    if (( stalled >= limit )); then
        moepipe_log "FAILED: a rank exited with code $rc, and $stalled requeues in a row got no further than" \
            "step $progress (MOEPIPE_MAX_STALLED_REQUEUES=$limit); not requeueing. See the lines above" \
            "(prefixed by node index) and train.output_dir/hang/; resubmit to resume from the last checkpoint."
        return "$rc"
    fi
    moepipe_log "a rank exited with code $rc at step $progress (a crash, a dead or hung rank; see" \
        "train.output_dir/hang/); requeueing job $SLURM_JOB_ID from the last checkpoint" \
        "($stalled of $limit requeues without progress)"
    scontrol requeue "$SLURM_JOB_ID" || moepipe_log "scontrol requeue failed; resubmit to resume"
    return "$EXIT_PREEMPTED"
}
