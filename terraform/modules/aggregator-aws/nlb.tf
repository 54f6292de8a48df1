# The agents' entry point: an internal network load balancer that passes TLS
# through on TCP 8443, so mutual TLS ends at the aggregator, which reads the
# agent's identity from its certificate. Health checks ask the admin port's
# GET /ready, which answers 200 only while the aggregator can reach
# PostgreSQL.

resource "aws_security_group" "nlb" {
  name        = "${var.name}-nlb"
  description = "Agent load balancer: TCP 8443 from the agents' networks"
  vpc_id      = aws_vpc.main.id

  tags = merge(local.tags, { Name = "${var.name}-nlb" })
}

resource "aws_security_group_rule" "nlb_agents_in" {
  security_group_id = aws_security_group.nlb.id
  description       = "Agents (mutual TLS, passed through)"
  type              = "ingress"
  protocol          = "tcp"
  from_port         = 8443
  to_port           = 8443
  cidr_blocks       = var.agent_cidrs
}

resource "aws_security_group_rule" "nlb_to_aggregator" {
  security_group_id        = aws_security_group.nlb.id
  description              = "Forward agent connections to the aggregator tasks"
  type                     = "egress"
  protocol                 = "tcp"
  from_port                = 8443
  to_port                  = 8443
  source_security_group_id = aws_security_group.aggregator.id
}

resource "aws_security_group_rule" "nlb_health_checks" {
  security_group_id        = aws_security_group.nlb.id
  description              = "Health checks to the aggregators' admin port"
  type                     = "egress"
  protocol                 = "tcp"
  from_port                = 9464
  to_port                  = 9464
  source_security_group_id = aws_security_group.aggregator.id
}

resource "aws_lb" "agents" {
  #checkov:skip=CKV_AWS_91:NLB access logs are written only for TLS listeners. This listener is TCP on purpose (TLS passthrough, so mutual TLS ends at the aggregator); connections are recorded by the VPC flow logs and the aggregator's own logs.
  name                             = "${var.name}-agents"
  internal                         = true
  load_balancer_type               = "network"
  subnets                          = aws_subnet.private[*].id
  security_groups                  = [aws_security_group.nlb.id]
  enable_cross_zone_load_balancing = true
  enable_deletion_protection       = var.deletion_protection
  # PrivateLink connections arrive from the load balancer's own addresses,
  # not from agent_cidrs; the endpoint service's allowed principals and
  # acceptance gate them instead.
  enforce_security_group_inbound_rules_on_private_link_traffic = length(var.privatelink_allowed_principals) > 0 ? "off" : "on"

  tags = local.tags
}

resource "aws_lb_target_group" "agents" {
  name                 = "${var.name}-agents"
  port                 = 8443
  protocol             = "TCP"
  target_type          = "ip"
  vpc_id               = aws_vpc.main.id
  deregistration_delay = 45
  # Agents keep connections open; closing them when a target is deregistered
  # makes them reconnect to a healthy replica at once.
  connection_termination = true

  health_check {
    enabled             = true
    protocol            = "HTTP"
    port                = "9464"
    path                = "/ready"
    matcher             = "200"
    interval            = 10
    timeout             = 5
    healthy_threshold   = 2
    unhealthy_threshold = 2
  }

  tags = local.tags
}

resource "aws_lb_listener" "agents" {
  load_balancer_arn = aws_lb.agents.arn
  port              = 8443
  protocol          = "TCP"

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.agents.arn
  }

  tags = local.tags
}

# Optional PrivateLink endpoint service: a customer creates an interface
# endpoint in its own VPC and its agents reach the aggregators privately.
resource "aws_vpc_endpoint_service" "agents" {
  count = length(var.privatelink_allowed_principals) > 0 ? 1 : 0

  acceptance_required        = true
  network_load_balancer_arns = [aws_lb.agents.arn]
  allowed_principals         = var.privatelink_allowed_principals

  tags = merge(local.tags, { Name = "${var.name}-agents" })
}
