#!/usr/bin/env bash
# A real single-node SLURM on this machine (Debian packages), for `make test-slurm`.
#
#   tests/slurm/cluster.sh up              install what is missing (apt), start munged, MariaDB,
#                                          slurmdbd, slurmctld, slurmd; wait until the node is idle
#   tests/slurm/cluster.sh down            stop every daemon this script started, by its PID
#   tests/slurm/cluster.sh status          the daemons and `sinfo`
#   tests/slurm/cluster.sh stop-slurmd     kill slurmd (SIGKILL: a node that dies, not one that
#                                          says goodbye); its running job steps are left behind
#   tests/slurm/cluster.sh start-slurmd    start it again and wait until the node is back
#
# Needs root (apt, /etc/slurm, /run/munge) and no systemd: each daemon runs in the foreground
# (-D, munged -F) in the background, its PID in $STATE/pids/. Everything else lives in $STATE
# (KOLORS_SLURM_STATE, default /tmp/kolors-slurm): configs rendered from the templates beside
# this script, spool, logs, the MariaDB data folder, the fake GPU devices. /etc/slurm/slurm.conf,
# gres.conf and slurmdbd.conf are symlinks into it; an /etc/slurm/slurm.conf that is not one of
# ours is never touched (the script refuses to start). `up` when already up does nothing.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
STATE=${KOLORS_SLURM_STATE:-/tmp/kolors-slurm}
CLUSTER=kolors
PARTITION=${KOLORS_SLURM_PARTITION:-debug}
ACCOUNT=${KOLORS_SLURM_ACCOUNT:-kolors}
GPUS=2
DB_PORT=${KOLORS_SLURM_DB_PORT:-3307}
DB_PASS=kolors-test-only
# The node is declared as this machine is: its CPUs (nproc) and its memory in MB (MemTotal), so a
# request the machine could never meet is refused as on a real cluster (kolors_story.host.slurm_fit).
MEMORY=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
ETC_FILES=(slurm.conf gres.conf slurmdbd.conf)
HOST=$(hostname -s)

log() { echo "cluster.sh: $*" >&2; }
die() { log "$*"; exit 1; }

# wait_for SECONDS WHAT COMMAND...: poll COMMAND every 0.5 s until it succeeds.
wait_for() {
    local seconds=$1 what=$2; shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "timed out after ${seconds}s waiting for $what (logs: $STATE/log/)"
        sleep 0.5
    done
}

pid_of() { cat "$STATE/pids/$1.pid" 2>/dev/null || true; }
alive() { local pid; pid=$(pid_of "$1"); [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; }

# start NAME COMMAND...: run a foreground daemon in the background, in its own session (a Ctrl-C
# in the terminal does not reach it; `down` stops it), output to $STATE/log/NAME.out.
start() {
    local name=$1; shift
    setsid "$@" >"$STATE/log/$name.out" 2>&1 < /dev/null &
    echo $! >"$STATE/pids/$name.pid"
    log "started $name (pid $!)"
}

# stop NAME [SIGNAL]: signal the recorded PID and wait (up to 20 s) until it is gone.
stop() {
    local name=$1 signal=${2:-TERM} pid
    pid=$(pid_of "$name")
    rm -f "$STATE/pids/$name.pid"
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -s "$signal" "$pid" 2>/dev/null || true
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || { log "stopped $name (pid $pid)"; return 0; }; sleep 0.5; done
    log "$name (pid $pid) ignored SIG$signal for 20 s; sending SIGKILL"
    kill -s KILL "$pid" 2>/dev/null || true
}

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${missing[@]}" >"$STATE/log/apt.log" 2>&1 ||
        { apt-get update -q >>"$STATE/log/apt.log" 2>&1 && apt-get install -y -q "${missing[@]}" >>"$STATE/log/apt.log" 2>&1; } ||
        die "apt-get install ${missing[*]} failed; see $STATE/log/apt.log"
}

render() {  # render TEMPLATE OUT
    local cpus; cpus=$(nproc); ((cpus >= 2)) || cpus=2
    sed -e "s|@STATE@|$STATE|g" -e "s|@HOST@|$HOST|g" -e "s|@CLUSTER@|$CLUSTER|g" \
        -e "s|@CPUS@|$cpus|g" -e "s|@MEMORY@|$MEMORY|g" -e "s|@GPUS@|$GPUS|g" \
        -e "s|@LASTGPU@|$((GPUS - 1))|g" -e "s|@PARTITION@|$PARTITION|g" \
        -e "s|@DB_PORT@|$DB_PORT|g" -e "s|@DB_PASS@|$DB_PASS|g" "$1" >"$2"
}

link_configs() {
    local f target
    mkdir -p /etc/slurm
    for f in "${ETC_FILES[@]}"; do
        target=/etc/slurm/$f
        if [[ -e $target || -L $target ]] && [[ $(readlink "$target" || true) != "$STATE/etc/$f" ]]; then
            die "$target exists and is not this test cluster's; refusing to replace it"
        fi
    done
    for f in "${ETC_FILES[@]}"; do ln -sfn "$STATE/etc/$f" "/etc/slurm/$f"; done
}

unlink_configs() {
    local f
    for f in "${ETC_FILES[@]}"; do
        [[ $(readlink "/etc/slurm/$f" 2>/dev/null || true) == "$STATE/etc/$f" ]] && rm -f "/etc/slurm/$f"
    done
    return 0
}

sql() { mariadb --no-defaults --socket="$STATE/mysql-run/mysqld.sock" -uroot -e "$1"; }

node_state() { sinfo -h -n "$HOST" -o %T 2>/dev/null; }
node_idle() { [[ $(node_state) == idle ]]; }

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "munged already answers; using it"
        return 0
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    start munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F
    wait_for 15 munged sh -c 'munge -n </dev/null | unmunge'
}

start_mariadb() {
    if [[ ! -d $STATE/mysql/mysql ]]; then
        mariadb-install-db --no-defaults --user=mysql --datadir="$STATE/mysql" --skip-test-db \
            --auth-root-authentication-method=socket >"$STATE/log/mariadb-install.log" 2>&1 ||
            die "mariadb-install-db failed; see $STATE/log/mariadb-install.log"
    fi
    install -d -o mysql -g mysql -m 0755 "$STATE/mysql-run"   # mariadbd runs as mysql: socket, pid
    chown -R mysql:mysql "$STATE/mysql"
    start mariadb /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$STATE/mysql" \
        --socket="$STATE/mysql-run/mysqld.sock" --port="$DB_PORT" --bind-address=127.0.0.1 \
        --pid-file="$STATE/mysql-run/mysqld.pid" \
        --innodb-buffer-pool-size=32M --skip-name-resolve
    wait_for 60 MariaDB mariadb-admin --no-defaults --socket="$STATE/mysql-run/mysqld.sock" -uroot ping
    sql "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
         GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
}

start_slurmd() {
    start slurmd /usr/sbin/slurmd -D
    wait_for 60 "node $HOST idle" node_idle
}

up() {
    [[ $(id -u) == 0 ]] || die "needs root (apt-get, /etc/slurm, /run/munge)"
    if alive slurmctld && alive slurmd && alive slurmdbd; then log "already up"; return 0; fi
    mkdir -p "$STATE"/{pids,log,etc,run,dev,spool/ctld,spool/d,mysql}
    chmod 0755 "$STATE" "$STATE/run"
    install_packages
    local t0=$SECONDS i
    for ((i = 0; i < GPUS; i++)); do [[ -c $STATE/dev/fakegpu$i ]] || mknod "$STATE/dev/fakegpu$i" c 1 3; done
    for f in "${ETC_FILES[@]}"; do render "$HERE/$f.in" "$STATE/etc/$f"; done
    chmod 0600 "$STATE/etc/slurmdbd.conf"   # slurmdbd refuses a readable one (it holds the DB password)
    link_configs
    alive munged || start_munge
    alive mariadb || start_mariadb
    alive slurmdbd || start slurmdbd /usr/sbin/slurmdbd -D
    wait_for 60 slurmdbd sacctmgr -n list cluster
    sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
    sacctmgr -n -P list account format=account | grep -qx "$ACCOUNT" || sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" >/dev/null
    sacctmgr -n -P list assoc user=root account="$ACCOUNT" format=user | grep -qx root ||
        sacctmgr -i add user root account="$ACCOUNT" cluster="$CLUSTER" >/dev/null
    alive slurmctld || start slurmctld /usr/sbin/slurmctld -D -c -i   # -c: no job state from an earlier run
    wait_for 60 slurmctld scontrol ping
    alive slurmd || start_slurmd
    wait_for 60 "node $HOST idle" node_idle
    log "up in $((SECONDS - t0)) s: partition $PARTITION, account $ACCOUNT, $GPUS GPUs (gres/gpu) on $HOST"
}

down() {
    # slurmd first (it would only report its node lost), then the controller, accounting, DB, munge.
    local name
    if alive slurmctld; then scancel --full -p "$PARTITION" 2>/dev/null || true; fi
    for name in slurmd slurmctld slurmdbd mariadb munged; do stop "$name"; done
    unlink_configs
}

status() {
    local name
    for name in munged mariadb slurmdbd slurmctld slurmd; do
        if alive "$name"; then echo "$name: running (pid $(pid_of "$name"))"; else echo "$name: not running"; fi
    done
    sinfo 2>/dev/null || true
}

case ${1:-} in
    up) up ;;
    down) down ;;
    status) status ;;
    stop-slurmd) stop slurmd KILL ;;
    start-slurmd) alive slurmd || start_slurmd ;;
    *) sed -n '2,16p' "$0" >&2; exit 2 ;;
esac
