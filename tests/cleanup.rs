//! The suite cleans up after itself on the stack's broker: a test's topics
//! go when its `TestEnv` does. A broker keeps files of every partition
//! open; before this, each run of the suite left some 4,000 partitions
//! behind, and the fifth run on one clone failed with the broker out of
//! file descriptors.

use std::time::Duration;

use firstcome_suite::TestEnv;
use firstcome_suite::topic::topics_starting_with;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_environment_dropped_leaves_none_of_its_topics_on_the_stack() {
    let mut env = TestEnv::new().await;
    // One topic more than `new` makes, as several tests do.
    env.use_single_partition().await;
    let brokers = env.common.kafka_brokers.clone();
    let prefix = format!("{}.", env.tag);
    let made = topics_starting_with(&brokers, &prefix);
    assert_eq!(made.len(), 4, "{made:?}");
    drop(env);
    // The controller has deleted them when the drop returns; the broker's
    // metadata follows the controller's log a moment later.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (b, p) = (brokers.clone(), prefix.clone());
        let left = tokio::task::spawn_blocking(move || topics_starting_with(&b, &p))
            .await
            .unwrap();
        if left.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "left on the stack's broker: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
