//! Any bytes as a service file: the parser must return a value or an error, never panic,
//! and what it accepts must build an argv.
#![no_main]

use std::path::Path;

use apptainer_supervisor::config;
use apptainer_supervisor::plan::argv;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/etc/apptainer-supervisor/fuzz.toml");
    match config::parse(text, path, None) {
        Ok(s) => {
            let a = argv::instance_start(&s);
            assert_eq!(a.last().map(|n| n.as_os_str()), Some(s.name.as_ref()));
            assert!(config::check_name(&s.name).is_ok());
            let _ = argv::overlay_create(&s, &s.overlay.path);
            let _ = argv::instance_stop_force(&s);
            let _ = argv::child_env(Vec::new(), &[], &s);
        }
        Err(e) => {
            // Every message is located in the file.
            assert!(e
                .to_string()
                .starts_with("/etc/apptainer-supervisor/fuzz.toml:"));
        }
    }
    let _ = config::parse_env_file(text);
});
