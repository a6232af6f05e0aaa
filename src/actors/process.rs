//! Actor processes: `rlrun actor <role>` spawned on a free loopback port by the controller (or a
//! pool), killed with their handle, and exiting by themselves when their parent goes.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{ActorConfig, Role};
use crate::error::{Error, IoContext, Result};

/// Exits this process once its parent has gone (a watchdog thread polls the parent pid): a
/// spawned actor never outlives the run that started it, however that run ended.
///
/// Not `PR_SET_PDEATHSIG`: that signal follows the *thread* that forked the child, and the
/// generator pool restarts dead members from short-lived request threads, whose exit would kill
/// the healthy replacement.
pub fn exit_with_parent() {
    let parent = std::os::unix::process::parent_id();
    std::thread::Builder::new()
        .name("rlrun-parent-watch".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(200));
            if std::os::unix::process::parent_id() != parent {
                eprintln!("rlrun actor: parent process {parent} exited; exiting");
                exit_now(3);
            }
        })
        .expect("spawning the parent watchdog");
}

/// Ends this process at once, without C++ static destructors: `exit()` would tear libtorch's
/// operator registry down under threads still running ops, and their requests would fail with
/// "no schema registered" errors that a client takes for a failed step instead of a lost peer.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit only ends the process; nothing is left half-written that exit() would finish
    // (Rust's buffered writers are not flushed by either).
    unsafe { libc::_exit(code) }
}

/// A spawned actor process.
pub struct ActorProcess {
    pub child: Child,
    pub addr: String,
    _config: tempfile::NamedTempFile,
}

impl Drop for ActorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `rlrun` binary that actor processes run: `$RLRUN_EXE`, else this executable when it is
/// `rlrun`, else `rlrun` beside it or on the PATH (a library user, e.g. Python, is not `rlrun`).
pub fn rlrun_exe() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("RLRUN_EXE") {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe().at("/proc/self/exe")?;
    if me.file_stem().is_some_and(|n| n == "rlrun") {
        return Ok(me);
    }
    let beside = me.with_file_name("rlrun");
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("rlrun"));
    std::iter::once(beside)
        .chain(on_path)
        .find(|p| p.is_file())
        .ok_or_else(|| Error::Usage("actor processes run the `rlrun` binary: set RLRUN_EXE to its path (or put it on the PATH)".into()))
}

/// Starts `rlrun actor <role>` on a free loopback port and waits for it to listen.
pub fn spawn(role: Role, cfg: &ActorConfig, env: &[(String, String)]) -> Result<ActorProcess> {
    let fail = |m: String| Error::Actor {
        role,
        addr: None,
        message: m,
    };
    let mut file = tempfile::Builder::new()
        .prefix("rlrun-actor-")
        .suffix(".json")
        .tempfile()
        .at(std::env::temp_dir())?;
    serde_json::to_writer(&mut file, cfg).map_err(|source| Error::Json {
        path: file.path().to_path_buf(),
        source,
    })?;
    let mut cmd = Command::new(rlrun_exe()?);
    cmd.args([
        "actor",
        role.as_str(),
        "--listen",
        "127.0.0.1:0",
        "--config",
    ])
    .arg(file.path())
    .arg("--exit-with-parent")
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| fail(format!("spawning the process: {e}")))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| fail("no stdout".into()))?;
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        match lines.next() {
            Some(Ok(l)) if l.starts_with("LISTENING ") => {
                break l["LISTENING ".len()..].trim().to_string()
            }
            Some(Ok(_)) => continue,
            _ => {
                let status = child.wait().map_err(|e| fail(e.to_string()))?;
                return Err(fail(format!(
                    "the process exited before listening ({status})"
                )));
            }
        }
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines.by_ref() {});
    Ok(ActorProcess {
        child,
        addr,
        _config: file,
    })
}
