//! Any bytes as a manifest, index or config: parsing and every choice made from the result
//! must return an error or a value, never panic.
#![no_main]

use jkmount::oci::digest::Digest;
use jkmount::oci::image::{self, ManifestDoc};
use jkmount::oci::platform::Platform;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    match image::parse_manifest(input, "fuzz", "fuzz") {
        Ok(ManifestDoc::Index(index)) => {
            let _ = image::select_platform(&index, &Platform::host(), "fuzz");
        }
        Ok(ManifestDoc::Image(manifest)) => {
            let _ = image::is_artifact(&manifest);
            let _ = image::descriptor_digest(&manifest.config, "config", "fuzz");
            for layer in &manifest.layers {
                let _ = image::descriptor_digest(layer, "layer", "fuzz");
                let _ = image::artifact_title(layer);
                let _ = image::layer_compression(&layer.media_type);
            }
        }
        Err(_) => {}
    }
    let _ = image::parse_diff_ids(input, &Digest::of(b""), "fuzz");
});
