//! Read-only file maps whose file may shrink under us.
//!
//! Reading a page of a mapped file that was truncated after it was mapped raises SIGBUS,
//! which by default kills the process with "Bus error" and leaves its half-written output
//! behind. [`install_sigbus_guard`] (called by the CLI) installs a handler that, for an
//! address inside one of the maps made here, puts a page of zeros over the missing page
//! and records the fault; the read goes on, and [`check_intact`], called before any
//! output is committed or any result is printed, turns the fault into an error naming the
//! file. A SIGBUS anywhere else still ends the process as before.

use anyhow::{bail, Result};
use memmap2::Mmap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Maps guarded at once; a process maps a model file and its data files (or one GGUF), so
/// this is far more than needed. A map made when all slots are taken is simply unguarded.
const SLOTS: usize = 64;

static STARTS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static LENS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
/// 1 + the slot of the first map that faulted; 0 while none did.
static FAULTED: AtomicUsize = AtomicUsize::new(0);
static PAGE: AtomicUsize = AtomicUsize::new(4096);
/// The paths of the slots, read only outside the handler.
static PATHS: Mutex<Vec<Option<PathBuf>>> = Mutex::new(Vec::new());
/// Paths of faulted maps that were dropped before anyone asked.
static FAULTED_PATH: Mutex<Option<PathBuf>> = Mutex::new(None);

/// A read-only map of a regular file, registered with the SIGBUS guard while it lives.
pub struct MappedFile {
    map: Mmap,
    slot: Option<usize>,
}

impl MappedFile {
    /// Maps the regular file at `path` ([`crate::files::open_regular`]).
    pub fn open(path: &Path) -> Result<MappedFile> {
        let file = crate::files::open_regular(path)?;
        // SAFETY: a read-only map of a file we do not write. Another process may still
        // change or truncate it; a truncation is caught by the SIGBUS guard (module doc).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| anyhow::anyhow!("map {}: {e}", path.display()))?;
        let slot = register(&map, path);
        Ok(MappedFile { map, slot })
    }
}

fn register(map: &Mmap, path: &Path) -> Option<usize> {
    if map.is_empty() {
        return None;
    }
    let start = map.as_ptr() as usize;
    let mut paths = PATHS.lock().unwrap_or_else(|e| e.into_inner());
    for (i, s) in STARTS.iter().enumerate() {
        if s.load(Ordering::Acquire) == 0 {
            // Length first: the handler matches on a non-zero start.
            LENS[i].store(map.len(), Ordering::Release);
            s.store(start, Ordering::Release);
            if paths.len() < SLOTS {
                paths.resize(SLOTS, None);
            }
            paths[i] = Some(path.to_path_buf());
            return Some(i);
        }
    }
    None
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            let mut paths = PATHS.lock().unwrap_or_else(|e| e.into_inner());
            if FAULTED.load(Ordering::Acquire) == i + 1 {
                *FAULTED_PATH.lock().unwrap_or_else(|e| e.into_inner()) = paths[i].clone();
            }
            STARTS[i].store(0, Ordering::Release);
            paths[i] = None;
        }
    }
}

impl AsRef<[u8]> for MappedFile {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

impl std::ops::Deref for MappedFile {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map
    }
}

/// Fails if a guarded map lost pages to a truncation since the process started: what was
/// read from it is not the file's content.
pub fn check_intact() -> Result<()> {
    let f = FAULTED.load(Ordering::Acquire);
    if f == 0 {
        return Ok(());
    }
    let path = PATHS.lock().unwrap_or_else(|e| e.into_inner()).get(f - 1).cloned().flatten();
    let path = path.or_else(|| FAULTED_PATH.lock().unwrap_or_else(|e| e.into_inner()).clone());
    let name = path.map_or_else(|| "an input file".to_string(), |p| p.display().to_string());
    bail!("{name} shrank while it was being read (truncated or rewritten by another program); nothing read from it can be trusted, and no output was kept")
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for i in 0..SLOTS {
        let start = STARTS[i].load(Ordering::Acquire);
        let len = LENS[i].load(Ordering::Acquire);
        if start != 0 && addr >= start && addr - start < len {
            let page = PAGE.load(Ordering::Relaxed);
            let at = addr & !(page - 1);
            // SAFETY: replaces one page of our own read-only file map (inside [start,
            // start + len)) with zeros; mmap is a plain system call, safe in a handler.
            let p = unsafe {
                libc::mmap(
                    at as *mut libc::c_void,
                    page,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                let _ = FAULTED.compare_exchange(0, i + 1, Ordering::AcqRel, Ordering::Acquire);
                return;
            }
        }
    }
    // Not ours (or the page could not be replaced): the default action, as without a guard.
    // SAFETY: resetting a disposition is async-signal-safe; returning re-raises the fault.
    unsafe {
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
    }
}

/// Installs the SIGBUS handler described in the module doc. Call once, early; calling it
/// again is harmless.
pub fn install_sigbus_guard() {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 {
        PAGE.store(page as usize, Ordering::Relaxed);
    }
    // SAFETY: a zeroed sigaction with our handler and SA_SIGINFO is a valid argument.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}
