//! File forms: a copy of a large page's body in an anonymous in-memory file (`memfd`), made off
//! the response path, so that the client API's HTTP/1.1 front can answer a plaintext cache hit
//! with `sendfile(2)`. The kernel then hands the file's pages to the socket instead of copying
//! the body from the heap once per answer (the copy that made nginx's `sendfile` faster than a
//! `writev` of the same bytes on ~80 KB pages).
//!
//! The copy costs memory (an entry's weight counts it from the start) and one file descriptor;
//! at most a quarter of the process's open-file limit (and at most 4,096) are used for file
//! forms, so they can never take the descriptors connections need. Without a form (the budget
//! spent, no `memfd`, TLS, gzip, HEAD) the body is written from memory as before.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Bodies from this size get a file form.
pub const FILE_MIN: usize = 32 * 1024;

/// A body's copy in a memfd, open for the form's life.
#[derive(Debug)]
pub struct FileForm {
    file: File,
    len: usize,
}

impl FileForm {
    /// A copy of `body`; `None` when the budget of descriptors is spent or no file could be
    /// made or written.
    pub fn new(body: &[u8]) -> Option<Self> {
        let taken = LIVE.fetch_add(1, Ordering::AcqRel);
        let made = (taken < budget()).then(|| Self::write(body)).flatten();
        if made.is_none() {
            LIVE.fetch_sub(1, Ordering::AcqRel);
        }
        made
    }

    fn write(body: &[u8]) -> Option<Self> {
        #[cfg(target_os = "linux")]
        {
            let fd = rustix::fs::memfd_create("page", rustix::fs::MemfdFlags::CLOEXEC).ok()?;
            let mut file = File::from(fd);
            file.write_all(body).ok()?;
            Some(Self {
                file,
                len: body.len(),
            })
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = body;
            None
        }
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for FileForm {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::AcqRel);
    }
}

/// File forms open now.
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// A quarter of the open-file limit, at most 4,096.
fn budget() -> usize {
    static BUDGET: OnceLock<usize> = OnceLock::new();
    *BUDGET.get_or_init(|| {
        let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(4 * 4096);
        usize::try_from(soft / 4).unwrap_or(4096).min(4096)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek};

    #[test]
    fn a_form_holds_the_body_and_gives_its_descriptor_back() {
        let body: Vec<u8> = (0..FILE_MIN * 2).map(|i| (i % 251) as u8).collect();
        let form = FileForm::new(&body).expect("a memfd");
        assert_eq!(form.len(), body.len());
        let mut back = Vec::new();
        let mut f = form.file();
        f.rewind().unwrap();
        f.read_to_end(&mut back).unwrap();
        assert_eq!(back, body);
        assert!(LIVE.load(Ordering::Acquire) >= 1);
        assert!(budget() >= 1);
    }
}
