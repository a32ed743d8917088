//! `exec-bench`: whole-process time of short commands, interleaved.
//!
//! Why not hyperfine: it runs all of one command's runs, then all of the
//! next's, so a machine that gets busier half-way (the other core is shared)
//! favours whichever came first. Here run *i* of every contender happens
//! back to back, round after round, so drift hits all of them alike; the
//! median of each is then compared with the first contender's (the floor,
//! `/bin/true`). Each run is spawn to reap: what git pays per helper call.
//!
//! The order within a round is shuffled afresh each round. A fixed order
//! gives every contender the same predecessor every time, and a predecessor
//! leaves the machine in its own state: after 20 ms of bash and curl both
//! CPUs are awake and the caches hold bash, after `/bin/true` a CPU may
//! already be idling again. Shuffled, each contender follows each other one
//! equally often, so that state is spread over all of them instead of
//! favouring one.
//!
//! ```text
//! exec-bench RUNS INPUT NAME=COMMAND [NAME=COMMAND…]
//! ```
//!
//! COMMAND is split on spaces (no shell: a shell would be timed too); INPUT
//! is the file each run reads as stdin (git's request); stdout and stderr go
//! to /dev/null. Output: one line per contender — median, p10, p90 and the
//! median as a multiple of the first contender's — and `--json` prints the
//! same as one JSON object for scripts.
//!
//! ```text
//! exec-bench --round-trip SOCKET RUNS
//! ```
//!
//! The daemon's side alone: RUNS connections from this one process, each
//! sending `{"v":1,"type":"get"}` and reading the answer line, timed from
//! connect to the answer's end; prints p50, p90 and p99 in µs.
#![forbid(unsafe_code)]

use std::fs::File;
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

struct Contender {
    name: String,
    argv: Vec<String>,
    micros: Vec<f64>,
}

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "--round-trip") {
        return round_trips(&args[1..]);
    }
    let json = args.first().is_some_and(|a| a == "--json");
    if json {
        args.remove(0);
    }
    if args.len() < 3 {
        eprintln!("usage: exec-bench [--json] RUNS INPUT NAME=COMMAND [NAME=COMMAND…]");
        return ExitCode::from(2);
    }
    let Ok(runs) = args[0].parse::<usize>() else {
        eprintln!("exec-bench: RUNS must be a whole number");
        return ExitCode::from(2);
    };
    let input = args[1].clone();
    let mut contenders = Vec::new();
    for spec in &args[2..] {
        let Some((name, command)) = spec.split_once('=') else {
            eprintln!("exec-bench: {spec:?} is not NAME=COMMAND");
            return ExitCode::from(2);
        };
        contenders.push(Contender {
            name: name.to_owned(),
            argv: command.split(' ').map(str::to_owned).collect(),
            micros: Vec::with_capacity(runs),
        });
    }
    let mut order: Vec<usize> = (0..contenders.len()).collect();
    let mut shuffle = Shuffle::seeded();
    // A few unmeasured rounds bring binaries and pages into the cache.
    for round in 0..runs + 20 {
        shuffle.shuffle(&mut order);
        for &at in &order {
            let contender = &mut contenders[at];
            match run_once(&contender.argv, &input) {
                Ok(micros) if round >= 20 => contender.micros.push(micros),
                Ok(_) => {}
                Err(e) => {
                    eprintln!("exec-bench: {}: {e}", contender.name);
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    let floor = percentile(&contenders[0].micros, 0.5);
    let mut lines = Vec::new();
    for contender in &contenders {
        let m = percentile(&contender.micros, 0.5);
        let p10 = percentile(&contender.micros, 0.10);
        let p90 = percentile(&contender.micros, 0.90);
        if json {
            lines.push(format!(
                "{:?}:{{\"median_us\":{m:.1},\"p10_us\":{p10:.1},\"p90_us\":{p90:.1},\"vs_floor\":{:.3}}}",
                contender.name,
                m / floor
            ));
        } else {
            println!(
                "{:<32} median {m:>7.1} µs   p10 {p10:>7.1}   p90 {p90:>7.1}   {:.2}× the first",
                contender.name,
                m / floor,
            );
        }
    }
    if json {
        println!("{{\"runs\":{runs},{}}}", lines.join(","));
    }
    ExitCode::SUCCESS
}

/// Fisher–Yates with xorshift64: the order of a round, not cryptography, so
/// std's clock is seed enough and no crate is needed.
struct Shuffle(u64);

impl Shuffle {
    fn seeded() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        // xorshift must not start at 0.
        Self(u64::from(nanos) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn shuffle(&mut self, items: &mut [usize]) {
        for i in (1..items.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}

/// One spawn-to-reap of `argv` with `input` as stdin, in microseconds; a
/// failing exit status is an error (a contender that broke is not fast).
fn run_once(argv: &[String], input: &str) -> Result<f64, String> {
    let stdin = File::open(input).map_err(|e| format!("opening {input}: {e}"))?;
    let mut command = Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .stdin(stdin)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let start = Instant::now();
    let status = command
        .status()
        .map_err(|e| format!("spawning {}: {e}", argv[0]))?;
    let micros = start.elapsed().as_secs_f64() * 1e6;
    if !status.success() {
        return Err(format!("exited with {status}"));
    }
    Ok(micros)
}

/// The `q` quantile of `values` (nearest rank).
fn percentile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let at = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[at]
}

/// `--round-trip SOCKET RUNS`: one client's connect-to-answer times.
fn round_trips(args: &[String]) -> ExitCode {
    use std::io::{BufRead, BufReader, Write};
    let (Some(socket), Some(Ok(runs))) = (args.first(), args.get(1).map(|r| r.parse::<usize>()))
    else {
        eprintln!("usage: exec-bench --round-trip SOCKET RUNS");
        return ExitCode::from(2);
    };
    let mut micros = Vec::with_capacity(runs);
    for round in 0..runs + 50 {
        let start = Instant::now();
        let answer = std::os::unix::net::UnixStream::connect(socket).and_then(|mut stream| {
            stream.write_all(b"{\"v\":1,\"type\":\"get\"}\n")?;
            let mut line = String::new();
            BufReader::new(stream).read_line(&mut line)?;
            Ok(line)
        });
        let elapsed = start.elapsed().as_secs_f64() * 1e6;
        match answer {
            Ok(line) if line.contains("\"type\":\"token\"") => {}
            Ok(_) => {
                eprintln!("exec-bench: {socket} did not answer with a token");
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("exec-bench: {socket}: {e}");
                return ExitCode::FAILURE;
            }
        }
        if round >= 50 {
            micros.push(elapsed);
        }
    }
    println!(
        "round trip, one client, {runs} runs: p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs",
        percentile(&micros, 0.5),
        percentile(&micros, 0.9),
        percentile(&micros, 0.99)
    );
    ExitCode::SUCCESS
}
