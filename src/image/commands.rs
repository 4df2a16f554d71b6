//! `mote image import|ls|rm`: the store, for people.

use std::path::Path;
use std::time::Instant;

use super::run::RunError;
use super::{Platform, Store, StoredImage};
use crate::cli::ImageCommand;

/// Carries out `command`, printing what it did on stdout.
pub fn run(command: &ImageCommand) -> Result<(), RunError> {
    match command {
        ImageCommand::Import {
            path,
            name,
            platform,
            store,
        } => {
            let store = Store::open(store.store.as_deref())?;
            import(
                &store,
                path,
                name.as_deref(),
                platform.unwrap_or(Platform::HOST),
            )
        }
        ImageCommand::Ls { store } => {
            let store = Store::open(store.store.as_deref())?;
            print!("{}", listing(&store.list()?));
            Ok(())
        }
        ImageCommand::Rm { references, store } => {
            let store = Store::open(store.store.as_deref())?;
            for reference in references {
                let image = store.remove(reference)?;
                println!("removed {} ({})", image.id, image.names.join(", "));
            }
            Ok(())
        }
    }
}

fn import(
    store: &Store,
    path: &Path,
    name: Option<&str>,
    platform: Platform,
) -> Result<(), RunError> {
    let started = Instant::now();
    let (image, cached) = store.import(path, name, platform)?;
    let what = if cached {
        "was in the store as"
    } else {
        "imported as"
    };
    println!(
        "{} {what} {} ({}) in {} ms",
        path.display(),
        image.id,
        image.names.join(", "),
        started.elapsed().as_millis()
    );
    Ok(())
}

/// One line an image name, as `docker images` shows them: name, id, size.
fn listing(images: &[StoredImage]) -> String {
    let mut rows = vec![("NAME".to_string(), "ID".to_string(), "SIZE".to_string())];
    for image in images {
        let size = format!("{:.1} MiB", image.size as f64 / (1024.0 * 1024.0));
        let names = if image.names.is_empty() {
            vec!["<none>".to_string()]
        } else {
            image.names.clone()
        };
        for name in names {
            rows.push((name, image.id.short().to_string(), size.clone()));
        }
    }
    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(name, id, size)| format!("{name:width$}  {id:12}  {size}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{ContainerConfig, Digest};

    #[test]
    fn listing_has_a_line_a_name() {
        let image = StoredImage {
            id: Digest::of(b"x"),
            names: vec!["a:1".into(), "longer-name:2".into()],
            config: ContainerConfig::default(),
            size: 3 << 20,
            imported: 0,
            architecture: None,
        };
        let text = listing(&[image]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("NAME "));
        assert!(lines[1].starts_with("a:1 ") && lines[1].ends_with("3.0 MiB"));
        assert!(lines[2].contains(Digest::of(b"x").short()));
    }
}
