//! Writes the demo image into an OCI layout: `cargo run --example demo_image -- DIR`.
//! Layer 1 holds the `greet` module under /jk/modules plus a stale file; layer 2 whites the
//! stale file out and adds `version.js`, so the mount shows a real union of two layers.

use jkmount::fixture::ImageBuilder;

fn file(path: &str, content: &str) -> String {
    format!(
        "f {path} 644 {}\n",
        serde_json::to_string(content).expect("a string serializes")
    )
}

fn main() -> std::io::Result<()> {
    let dir = std::env::args().nth(1).expect("usage: demo_image DIR");
    let base = ["d /jk 755", "d /jk/modules 755", "d /jk/modules/greet 755"].join("\n")
        + "\n"
        + &file(
            "/jk/modules/greet/package.json",
            include_str!("../demo/modules/greet/package.json"),
        )
        + &file(
            "/jk/modules/greet/index.js",
            include_str!("../demo/modules/greet/index.js"),
        )
        + &file("/jk/modules/greet/STALE.md", "removed by the next layer\n");
    let top = "w /jk/modules/greet/.wh.STALE.md\n".to_owned()
        + &file(
            "/jk/modules/greet/version.js",
            include_str!("../demo/modules/greet/version.js"),
        );
    let image = ImageBuilder::new().layer(&base).layer(&top).build();
    image.write_layout(std::path::Path::new(&dir), "demo")?;
    println!("wrote oci:{dir}:demo (manifest {})", image.manifest.digest);
    Ok(())
}
