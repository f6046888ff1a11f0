//! What more than one bench needs: a broker with the bench's topics.

use conveyor::dev::DevCluster;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;

/// The external broker at `brokers`, or a mock cluster started here (kept
/// running while the returned cluster lives), with `topics` created, each
/// with `partitions` partitions; and its bootstrap servers.
pub async fn broker_with_topics(
    brokers: Option<&str>,
    topics: &[&str],
    partitions: i32,
) -> (Option<DevCluster>, String) {
    match brokers {
        Some(b) => {
            let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", b)
                .create()
                .expect("admin");
            let new: Vec<NewTopic<'_>> = topics
                .iter()
                .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
                .collect();
            for r in admin
                .create_topics(&new, &AdminOptions::new())
                .await
                .expect("create topics")
            {
                r.expect("topic created");
            }
            (None, b.to_owned())
        }
        None => {
            let cluster = DevCluster::start(1).expect("mock cluster");
            for t in topics {
                cluster.create_topic(t, partitions).expect("topic");
            }
            let brokers = cluster.bootstrap_servers();
            (Some(cluster), brokers)
        }
    }
}
