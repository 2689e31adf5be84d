//! The `rewind` binary: parses the command line and hands each subcommand
//! to the library. This is the only place where errors become `anyhow`
//! and exit codes, and where output is formatted for people.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use rewind::cli::{Cli, Command, DebugCommand, KeyCommand, ProgressArgs, StoreArgs};
use rewind::clock::{fmt_ns, parse_at};
use rewind::progress::{Meter, Style};
use rewind::store::sealed::{read_key_file, Encryption};
use rewind::store::{self, Store, StoreOptions};
use rewind::timeline::{lineage_id, Timeline};

/// Progress on stderr: a bar on a terminal, periodic plain lines in a log,
/// nothing with --quiet.
fn meter(args: &ProgressArgs, quiet: bool) -> Meter {
    use std::io::IsTerminal;
    let style = if quiet {
        Style::Silent
    } else if std::io::stderr().is_terminal() {
        Style::Bar
    } else {
        Style::Lines {
            every: args.progress_every,
        }
    };
    Meter::new(style, Box::new(std::io::stderr()))
}

/// The mount keeps a handle per inode the kernel holds, and restore one per
/// directory: raise the soft descriptor limit to the hard one.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current < l.maximum {
        l.current = l.maximum;
        let _ = setrlimit(Resource::Nofile, l);
    }
}

/// `rewind diff` for people: one line per change, then one per second.
fn print_diff(r: &rewind::diff::Report) {
    println!(
        "changes in lineage {} from {} to {} ({} records between)",
        r.lineage, r.from, r.to, r.records
    );
    if r.changes.is_empty() {
        println!("no file changed");
    } else {
        println!("{:<9} {:<8} PATH", "CHANGE", "KIND");
    }
    for c in &r.changes {
        let mut line = format!("{:<9} {:<8} {}", c.change.name(), c.kind, c.path);
        if c.paths.len() > 1 {
            line += &format!(" (+{} hard links)", c.paths.len() - 1);
        }
        if !c.from.is_empty() {
            line += &format!(" (was {})", c.from.join(", "));
        }
        if let Some(n) = c.bytes_written {
            line += &format!(", {n} bytes written");
        }
        match (&c.before, &c.after) {
            (Some(b), Some(a)) => line += &format!(", {b} -> {a}"),
            (None, Some(a)) if c.kind == "file" => line += &format!(", {a} bytes"),
            _ => {}
        }
        println!("{line}");
    }
    if !r.seconds.is_empty() {
        println!();
        println!(
            "{:<24} {:>14} {:>15} {:>6}",
            "SECOND", "BYTES WRITTEN", "FULL REWRITES", "RATIO"
        );
    }
    for s in &r.seconds {
        let ratio = s
            .compression_ratio
            .map(|x| format!("{x:.2}"))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<24} {:>14} {:>15} {:>6}",
            s.time, s.bytes_written, s.files_rewritten, ratio
        );
    }
}

fn main() {
    rewind::run::bound_malloc();
    let cli = Cli::parse();
    raise_fd_limit();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rewind: error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

/// Writes the one-shot marker durably, so a recreated pod does not restore
/// again over newer data.
fn write_marker(marker: &std::path::Path, r: &rewind::restore::Restored) -> std::io::Result<()> {
    let dir = marker.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = marker.with_extension("tmp");
    std::fs::write(
        &tmp,
        format!(
            "restored at {} from lineage {}\n",
            fmt_ns(r.at_ns),
            lineage_id(r.lineage)
        ),
    )?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, marker)?;
    std::fs::File::open(dir)?.sync_all()
}

fn open_store(a: &StoreArgs) -> anyhow::Result<Arc<dyn Store>> {
    rewind::timeline::check_volume_name(&a.volume).map_err(|e| anyhow::anyhow!("--volume: {e}"))?;
    let opts = StoreOptions {
        s3_endpoint: a.s3_endpoint.clone(),
        s3_path_style: a.s3_path_style,
        ..Default::default()
    };
    let encryption = match &a.encryption_key_file {
        Some(path) => Encryption::Key {
            kek: read_key_file(path)?,
            create: false,
        },
        None => Encryption::Off,
    };
    let volume = store::open_volume(&a.store, &a.volume, &opts, encryption)?;
    volume.check()?;
    Ok(volume)
}

/// The store and the plan for TIME (`at`) of `rewind restore` and `rewind
/// mount`. A TIME between kept points that --or-earlier moved to the
/// nearest earlier point is said out loud, with what the command does at
/// that point (`doing`), so that nobody takes it for the instant asked.
fn plan_at(
    store: &StoreArgs,
    at: &str,
    lineage: Option<&str>,
    or_earlier: bool,
    doing: &str,
) -> anyhow::Result<(Arc<dyn Store>, rewind::timeline::Plan)> {
    let at = parse_at(at)?;
    let store = open_store(store)?;
    let t = Timeline::load(store.as_ref())?;
    let plan = t.plan_at(at, lineage, or_earlier)?;
    if let rewind::timeline::Resolved::Earlier { asked_ns } = plan.resolved {
        println!(
            "{} falls between kept points; {doing} the nearest point at or before it, {} (--or-earlier)",
            fmt_ns(asked_ns),
            fmt_ns(plan.at_ns)
        );
    }
    Ok((store, plan))
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Run(args) => Ok(rewind::run::run(args)?),
        Command::Restore(args) => {
            if let Some(marker) = &args.once_marker {
                if marker.exists() {
                    println!(
                        "already restored once ({} exists); nothing to do",
                        marker.display()
                    );
                    return Ok(0);
                }
            }
            let (store, plan) = plan_at(
                &args.store,
                &args.at,
                args.lineage.as_deref(),
                args.or_earlier,
                "restoring",
            )?;
            let quiet = args.quiet;
            let mut progress = |m: &str| {
                if !quiet {
                    eprintln!("rewind: {m}");
                }
            };
            let started = std::time::Instant::now();
            let meter = meter(&args.progress, quiet);
            let r = match rewind::restore::restore_with(
                store.as_ref(),
                &plan,
                &args.target,
                args.force,
                &rewind::restore::Options {
                    jobs: usize::from(args.jobs),
                    meter: &meter,
                    paths: &args.paths,
                },
                &mut progress,
            ) {
                // Refused before the target was touched.
                Err(e @ rewind::restore::RestoreError::NoSuchPath { .. }) => return Err(e.into()),
                r => r,
            }
            .with_context(|| {
                format!(
                    "restore into {} failed; it is marked incomplete (.rewind/restore-incomplete)",
                    args.target.display()
                )
            })?;
            // Warnings are printed even with --quiet: the target lacks
            // these paths.
            for s in &r.skipped {
                eprintln!("rewind: warning: {s}");
            }
            let skipped = match r.skipped.len() {
                0 => String::new(),
                n => format!("; {n} device node(s) NOT restored (see the warnings above)"),
            };
            println!(
                "restored {} at {} (lineage {}, base completed {}, {} records from {} segments and {} deltas, last change {}) into {} in {:.2}s{skipped}",
                args.store.volume,
                fmt_ns(r.at_ns),
                lineage_id(r.lineage),
                fmt_ns(r.base_completed_ns),
                r.records,
                r.segments,
                r.deltas,
                r.last_record_ns.map(fmt_ns).unwrap_or_else(|| "none after the base".into()),
                args.target.display(),
                started.elapsed().as_secs_f64()
            );
            if let Some(marker) = &args.once_marker {
                write_marker(marker, &r).with_context(|| {
                    format!(
                        "restore finished, but the one-shot marker {} could not be written",
                        marker.display()
                    )
                })?;
            }
            Ok(0)
        }
        Command::Mount(args) => mount(args),
        Command::Diff(args) => {
            let (from, to) = (parse_at(&args.from)?, parse_at(&args.to)?);
            let store = open_store(&args.store)?;
            let t = Timeline::load(store.as_ref())?;
            let r = rewind::diff::diff(
                store.as_ref(),
                &t,
                from,
                to,
                args.lineage.as_deref(),
                args.path.as_deref(),
            )?;
            match args.output {
                rewind::cli::Output::Json => println!("{}", serde_json::to_string_pretty(&r)?),
                rewind::cli::Output::Table => print_diff(&r),
            }
            Ok(0)
        }
        Command::Ls(args) => {
            let store = open_store(&args.store)?;
            let t = Timeline::load(store.as_ref())?;
            let windows = t.windows();
            let window = windows.iter().max_by_key(|w| w.latest_ns);
            if args.json {
                let v = serde_json::json!({
                    "volume": args.store.volume,
                    "window": window,
                    "windows": windows,
                    "lineages": t.lineage_summary().iter().map(|(id, (segs, bases))| serde_json::json!({
                        "id": id, "segments": segs, "bases": bases,
                        "started": t.lineages.iter().find(|l| &lineage_id(l.lineage) == id).map(|l| serde_json::json!({"ns": l.started_ns, "reason": l.reason})),
                    })).collect::<Vec<_>>(),
                    "bases": t.bases.iter().map(|b| serde_json::json!({
                        "lineage": lineage_id(b.lineage), "start_seq": b.start_seq, "completed_ns": b.completed_ns,
                        "completed": fmt_ns(b.completed_ns), "kind": format!("{:?}", b.kind).to_lowercase(), "key": b.key(),
                    })).collect::<Vec<_>>(),
                    "segments": t.segments.iter().map(|s| serde_json::json!({
                        "lineage": lineage_id(s.lineage), "first_seq": s.first_seq, "last_seq": s.last_seq,
                        "first_ns": s.first_ns, "last_ns": s.last_ns, "key": s.key(),
                    })).collect::<Vec<_>>(),
                    "deltas": t.deltas.len(),
                    "heartbeats": t.heartbeats,
                    "gaps": t.gaps(),
                    "chunks": t.chunks,
                    "points": t.points(),
                    "tiers": tiers(&t),
                    "condemned": {
                        "markers": t.condemned.len(),
                        "segments": t.condemned_segments.len(),
                        "deltas": t.condemned_deltas.len(),
                        "bases": t.condemned_bases.len(),
                    },
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(0);
            }
            println!("volume {} in {}", args.store.volume, args.store.store);
            match window {
                Some(w) => println!(
                    "restore window: {} .. {} (lineage {})",
                    w.earliest, w.latest, w.lineage
                ),
                None => println!("restore window: none yet (no base has completed)"),
            }
            for (id, (segs, bases)) in t.lineage_summary() {
                let started = t.lineages.iter().find(|l| lineage_id(l.lineage) == id);
                println!(
                    "lineage {id}: {segs} segments, {bases} bases{}",
                    started
                        .map(|l| format!(", started {} ({})", fmt_ns(l.started_ns), l.reason))
                        .unwrap_or_default()
                );
            }
            for tier in tiers(&t) {
                println!("{}", tier.line);
            }
            for b in &t.bases {
                println!(
                    "  base {:?} completed {} (lineage {}, from seq {})",
                    b.kind,
                    fmt_ns(b.completed_ns),
                    lineage_id(b.lineage),
                    b.start_seq
                );
            }
            for g in t.gaps() {
                println!(
                    "  gap {} .. {} (lineage {}): {}",
                    fmt_ns(g.from_ns),
                    fmt_ns(g.to_ns),
                    g.lineage,
                    g.reason
                );
            }
            if let (Some(f), Some(l)) = (t.segments.first(), t.segments.last()) {
                println!(
                    "segments: {} from {} to {}",
                    t.segments.len(),
                    fmt_ns(f.first_ns),
                    fmt_ns(l.last_ns)
                );
            }
            if !t.deltas.is_empty() {
                println!(
                    "deltas: {} (the minutes tier, compacted by prune)",
                    t.deltas.len()
                );
            }
            println!("chunks: {}", t.chunks);
            if !t.condemned.is_empty() {
                println!(
                    "condemned by prune, deleted by a later one: {} segments, {} deltas, {} bases ({} markers)",
                    t.condemned_segments.len(),
                    t.condemned_deltas.len(),
                    t.condemned_bases.len(),
                    t.condemned.len()
                );
            }
            Ok(0)
        }
        Command::Prune(args) => {
            let store = open_store(&args.store)?;
            let opts = rewind::prune::PruneOptions {
                policy: rewind::retention::Policy {
                    seconds: args.keep_seconds,
                    minutes: args.keep_minutes,
                    hours: args.keep_hours,
                    days: args.keep_days,
                },
                grace: args.grace,
                dry_run: args.dry_run,
            };
            let report = rewind::prune::prune(store.as_ref(), &opts)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!(
                    "{}",
                    rewind::prune::render(&report, &args.store.volume, &opts)
                );
            }
            Ok(0)
        }
        Command::Key(KeyCommand::Rotate(args)) => {
            let old = read_key_file(&args.old_key_file)?;
            let new = read_key_file(&args.new_key_file)?;
            let (old_id, new_id) = (old.id(), new.id());
            let location = StoreArgs {
                store: args.store,
                volume: args.volume,
                s3_endpoint: args.s3_endpoint,
                s3_path_style: args.s3_path_style,
                encryption_key_file: None,
            };
            rewind::timeline::check_volume_name(&location.volume)
                .map_err(|e| anyhow::anyhow!("--volume: {e}"))?;
            let opts = StoreOptions {
                s3_endpoint: location.s3_endpoint.clone(),
                s3_path_style: location.s3_path_style,
                ..Default::default()
            };
            let volume = store::open_volume(
                &location.store,
                &location.volume,
                &opts,
                Encryption::Key {
                    kek: old.clone(),
                    create: false,
                },
            )?;
            volume.check().context("--old-key-file")?;
            volume.rotate(&old, &new)?;
            println!(
                "rotated volume {}: its data key is now wrapped for key {new_id} only (was {old_id}); no data was rewritten",
                location.volume
            );
            Ok(0)
        }
        Command::Verify(args) => {
            let store = open_store(&args.store)?;
            let meter = meter(&args.progress, false);
            let rep = rewind::verify::verify_with(store.as_ref(), &meter, &mut |m| {
                eprintln!("rewind: {m}")
            })?;
            drop(meter);
            println!(
                "checked {} segments ({} records), {} deltas, {} bases, {} chunks",
                rep.segments, rep.records, rep.deltas, rep.bases, rep.chunks
            );
            if rep.problems.is_empty() {
                println!("ok: every object checks out and the timeline is continuous");
                Ok(0)
            } else {
                for p in &rep.problems {
                    println!("DAMAGE: {p}");
                }
                println!("{} problems found", rep.problems.len());
                Ok(1)
            }
        }
        Command::Debug(DebugCommand::Records { store }) => {
            let store = open_store(&store)?;
            let t = Timeline::load(store.as_ref())?;
            for s in &t.segments {
                let (_, recs) = rewind::segment::decode(&store.get(&s.key())?)?;
                for r in recs {
                    let mut line = format!("{r:?}");
                    line.truncate(400);
                    println!("{line}");
                }
            }
            Ok(0)
        }
        Command::Debug(DebugCommand::Bases { store }) => {
            let store = open_store(&store)?;
            let t = Timeline::load(store.as_ref())?;
            for b in &t.bases {
                let m = rewind::base::load_manifest(store.as_ref(), b)?;
                println!("base {} root {}", b.key(), m.root);
                for o in &m.objects {
                    println!(
                        "  object {} {:?} mode {:o} size {}",
                        o.ino, o.kind, o.mode, o.size
                    );
                }
                for l in &m.links {
                    println!(
                        "  link {} {:?} -> {}",
                        l.parent,
                        String::from_utf8_lossy(&l.name),
                        l.ino
                    );
                }
            }
            Ok(0)
        }
        Command::Debug(DebugCommand::Journal { journal_dir, json }) => {
            let mut paths: Vec<_> = std::fs::read_dir(&journal_dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "rwj"))
                .collect();
            paths.sort();
            for p in paths {
                for (off, len, rec) in rewind::journal::dump_file(&p)? {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"file": p, "offset": off, "len": len, "seq": rec.seq, "time_ns": rec.time, "kind": rec.op.kind_name()})
                        );
                    } else {
                        println!(
                            "{} @{off} seq {} {} {}",
                            p.display(),
                            rec.seq,
                            fmt_ns(rec.time),
                            rec.op.kind_name()
                        );
                    }
                }
            }
            Ok(0)
        }
        Command::Webhook(args) => webhook(args),
    }
}

/// One retention tier of one lineage as `ls` shows it.
#[derive(serde::Serialize)]
struct TierLine {
    lineage: String,
    tier: &'static str,
    granularity: &'static str,
    points: usize,
    from_ns: rewind::clock::Nanos,
    to_ns: rewind::clock::Nanos,
    #[serde(skip)]
    line: String,
}

/// Each lineage's continuous window and its kept points, grouped by the
/// tier the newest prune's policy put them in (by their age at that prune).
fn tiers(t: &Timeline) -> Vec<TierLine> {
    let mut out = Vec::new();
    for span in rewind::retention::tier_spans(t) {
        let (name, gran) = match span.tier {
            Some(t) => (t.name(), t.granularity()),
            None => ("points", "kept bases"),
        };
        let line = if span.tier == Some(rewind::retention::Tier::Seconds) {
            format!(
                "  lineage {}: every instant from {} to {}",
                span.lineage,
                fmt_ns(span.from_ns),
                fmt_ns(span.to_ns)
            )
        } else {
            format!(
                "  lineage {}: {} tier, {} points from {} to {} ({})",
                span.lineage,
                name,
                span.points,
                fmt_ns(span.from_ns),
                fmt_ns(span.to_ns),
                gran
            )
        };
        out.push(TierLine {
            line,
            lineage: span.lineage,
            tier: name,
            granularity: gran,
            points: span.points,
            from_ns: span.from_ns,
            to_ns: span.to_ns,
        });
    }
    if let Some(m) = &t.policy {
        let d = |x: std::time::Duration| humantime::format_duration(x).to_string();
        out.push(TierLine {
            line: format!(
                "  retention applied {}: every instant for {}, a point a minute for {}, an hour for {}, a day for {}",
                fmt_ns(m.applied_ns),
                d(m.policy.seconds),
                d(m.policy.minutes),
                d(m.policy.hours),
                d(m.policy.days)
            ),
            lineage: String::new(),
            tier: "policy",
            granularity: "",
            points: 0,
            from_ns: m.applied_ns,
            to_ns: m.applied_ns,
        });
    }
    out
}

/// `rewind mount`: builds the view, mounts it, and unmounts on SIGTERM or
/// SIGINT (or ends when someone else unmounts it).
fn mount(args: rewind::cli::MountArgs) -> anyhow::Result<i32> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    // Caught before the mount goes live, so an early stop still unmounts.
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    let (store, plan) = plan_at(
        &args.store,
        &args.at,
        args.lineage.as_deref(),
        args.or_earlier,
        "showing",
    )?;
    let started = std::time::Instant::now();
    // A bar on a terminal, periodic lines in a log, while the tree is built.
    let meter = meter(&args.progress, false);
    let (view, opened) =
        rewind::view::View::open(store, &plan, args.cache_size, &meter, &mut |m| {
            eprintln!("rewind: {m}")
        })
        .context("cannot build the view")?;
    drop(meter);
    let session = rewind::view::mount(view, &args.mountpoint, args.threads).with_context(|| {
        format!(
            "cannot mount at {} (is it an existing directory, is /dev/fuse available, are we root?)",
            args.mountpoint.display()
        )
    })?;
    println!(
        "mounted {} at {} read-only on {} (lineage {}, base completed {}, {} records, last change {}, {} entries) in {:.2}s; SIGTERM or Ctrl-C unmounts",
        args.store.volume,
        fmt_ns(plan.at_ns),
        args.mountpoint.display(),
        lineage_id(plan.lineage),
        fmt_ns(opened.base_completed_ns),
        opened.records,
        opened.last_record_ns.map(fmt_ns).unwrap_or_else(|| "none after the base".into()),
        opened.files,
        started.elapsed().as_secs_f64()
    );
    let (tx, rx) = crossbeam_channel::bounded(1);
    let handle = signals.handle();
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            let _ = tx.send(());
        }
    });
    crossbeam_channel::select! {
        recv(rx) -> _ => {}
        recv(session.ended()) -> _ => {
            handle.close();
            println!("{} was unmounted", args.mountpoint.display());
            return Ok(0);
        }
    }
    handle.close();
    drop(session);
    println!("unmounted {}", args.mountpoint.display());
    Ok(0)
}

fn webhook(args: rewind::cli::WebhookArgs) -> anyhow::Result<i32> {
    let config = match &args.config {
        Some(path) => rewind::webhook::Config::load(path)?,
        None => {
            let config = rewind::webhook::Config::default();
            config.validate()?;
            config
        }
    };
    rewind::http::serve_webhook(&args.listen, &args.tls_cert, &args.tls_key, config)
        .context("admission webhook")?;
    Ok(0)
}
