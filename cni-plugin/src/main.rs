//! `calyx`: the Calyx CNI plugin. stdout carries the protocol (a result or an error
//! object); logs go to stderr, or to `logFile` when the config names one.

mod check;
mod commands;
mod config;
mod error;
mod pod_network;
mod result;
#[cfg(test)]
mod robustness;
mod version;
mod wiring;

use std::io::{Read, Write};

use config::{CniEnv, NetConf};
use error::{CniError, Code};

fn main() {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    // Best effort: the version to answer in, and where to log, even for bad input.
    let conf = NetConf::parse(&stdin).ok();
    init_logging(conf.as_ref());
    let answer_version = version::answer_version(&stdin);

    let outcome = match read {
        Err(e) => Err(CniError::new(Code::Io, format!("read stdin: {e}"))),
        Ok(_) => CniEnv::from_vars(|k| std::env::var(k).ok()).and_then(|env| {
            // One thread: setns() into the pod's namespace must not leave a pooled
            // worker behind in it, and a CNI call is short enough not to need more.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| CniError::new(Code::Io, format!("start runtime: {e}")))?;
            let command = env.command.clone();
            let started = std::time::Instant::now();
            let result = runtime.block_on(commands::run(&env, &stdin));
            tracing::info!(%command, elapsed_us = started.elapsed().as_micros() as u64, ok = result.is_ok(), "done");
            result
        }),
    };

    let mut stdout = std::io::stdout().lock();
    let code = match outcome {
        Ok(Some(value)) => {
            let _ = writeln!(stdout, "{value}");
            0
        }
        Ok(None) => 0,
        Err(err) => {
            tracing::error!(code = err.code as u32, error = %err, "failed");
            let _ = writeln!(stdout, "{}", err.to_json(answer_version));
            1
        }
    };
    let _ = stdout.flush();
    std::process::exit(code);
}

fn init_logging(conf: Option<&NetConf>) {
    use tracing_subscriber::EnvFilter;
    let level = conf
        .and_then(|c| c.log_level.clone())
        .or_else(|| std::env::var("CALYX_LOG").ok())
        .unwrap_or_else(|| "warn".into());
    let filter = EnvFilter::try_new(&level).unwrap_or_else(|_| EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(false);
    let log_file = conf.and_then(|c| c.log_file.as_ref()).and_then(|path| {
        // The directory may not exist on a fresh host; logging must not fail the call.
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ok()
    });
    match log_file {
        Some(file) => builder
            .json()
            .with_writer(std::sync::Mutex::new(file))
            .init(),
        None => builder.with_writer(std::io::stderr).init(),
    }
}
