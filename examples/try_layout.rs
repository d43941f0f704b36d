use jkmount::fixture::ImageBuilder;
fn main() {
    let dir = std::env::args().nth(1).unwrap();
    ImageBuilder::new()
        .layer("d /d 755\nf /d/a 644 \"a\" mtime=1600000000.5\nh /d/b /d/a\nc /dev/null2 666 1:3\np /fifo 600\nl /link d/a\nf /s 4755 \"suid\" uid=7 gid=8 x:user.k=\"v\"")
        .layer("w /d/.wh.a\nf /new 644 \"n\"")
        .build()
        .write_layout(std::path::Path::new(&dir), "t")
        .unwrap();
}
