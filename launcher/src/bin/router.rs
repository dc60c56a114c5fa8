//! `text-generation-router`: see `text_generation_router::serve`.

#[tokio::main]
async fn main() {
    text_generation_router::serve::main().await
}
